//! pkcs11-arrays: the PKCS#11 array attributes that cryptoki 0.12 cannot express, on cryptoki's
//! own sessions and object handles.
//!
//! `CKA_WRAP_TEMPLATE` and `CKA_UNWRAP_TEMPLATE` (PKCS#11 v2.40 section 4.8) hold an array of
//! `CK_ATTRIBUTE`, each pointing at its own value. cryptoki's `Attribute` has no variant for
//! them, and its `VendorDefined` escape carries plain bytes, not the pointers such an array
//! holds. smartsign needs them on its key-encryption key, so this crate makes the three raw
//! calls that set and read them: `C_GenerateKey` with array attributes in the template,
//! `C_CreateObject` likewise, and `C_GetAttributeValue` of one array attribute.
//!
//! It is the one crate of the workspace with `unsafe` code. It loads the same module file that
//! cryptoki initialised (the dynamic loader hands back the one instance of the library in the
//! process, whose `C_Initialize` cryptoki has called) and calls it with the raw handles of
//! cryptoki's [`Session`] and [`ObjectHandle`]. Everything else, including every other call on
//! the same objects, stays with cryptoki. Nothing here logs in, opens sessions or finalises.

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::ptr;

use cryptoki::context::Function;
use cryptoki::error::{Error, Rv, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;
use cryptoki_sys::{
    CK_ATTRIBUTE, CK_ATTRIBUTE_TYPE, CK_MECHANISM, CK_OBJECT_HANDLE, CK_ULONG,
    CK_UNAVAILABLE_INFORMATION, CKA_UNWRAP_TEMPLATE, CKA_WRAP_TEMPLATE,
};

/// The largest single value read back from an array attribute; templates hold flags, classes
/// and key types, so anything near this is a module's mistake, not a template.
const MAX_VALUE_LEN: CK_ULONG = 64 * 1024;

/// An attribute whose value is an array of attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ArrayAttribute {
    /// `CKA_WRAP_TEMPLATE`: a key this key wraps must match every attribute in it.
    WrapTemplate,
    /// `CKA_UNWRAP_TEMPLATE`: every key this key unwraps gets exactly these attributes.
    UnwrapTemplate,
}

impl ArrayAttribute {
    fn code(self) -> CK_ATTRIBUTE_TYPE {
        match self {
            ArrayAttribute::WrapTemplate => CKA_WRAP_TEMPLATE,
            ArrayAttribute::UnwrapTemplate => CKA_UNWRAP_TEMPLATE,
        }
    }
}

impl fmt::Display for ArrayAttribute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArrayAttribute::WrapTemplate => "CKA_WRAP_TEMPLATE",
            ArrayAttribute::UnwrapTemplate => "CKA_UNWRAP_TEMPLATE",
        })
    }
}

/// The raw entry points of a PKCS#11 module that cryptoki has loaded and initialised.
pub struct Arrays {
    module: cryptoki_sys::Pkcs11,
}

impl fmt::Debug for Arrays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Arrays").finish_non_exhaustive()
    }
}

impl Arrays {
    /// Loads the module at `path`: the same file as the `cryptoki::context::Pkcs11` whose
    /// sessions will be passed in (the methods below take sessions of that module only).
    ///
    /// Like cryptoki's own `Pkcs11::new`, this is a safe function that runs a library's
    /// initialisers: give it the path of the PKCS#11 module the process already uses, nothing
    /// else.
    pub fn load(path: &Path) -> Result<Arrays, Error> {
        // SAFETY: loading a shared library runs its initialisers. The caller gives the path of
        // the PKCS#11 module that cryptoki already loaded in this process, so the loader returns
        // that instance, whose initialisers have run; no symbol is called here.
        #[allow(unsafe_code)]
        let module = unsafe { cryptoki_sys::Pkcs11::new(path) }.map_err(Error::LibraryLoading)?;
        Ok(Arrays { module })
    }

    /// `C_GenerateKey` with `template` and, beside it, the array attributes in `arrays`.
    pub fn generate_key(
        &self,
        session: &Session,
        mechanism: &Mechanism<'_>,
        template: &[Attribute],
        arrays: &[(ArrayAttribute, &[Attribute])],
    ) -> Result<ObjectHandle, Error> {
        let generate = self
            .module
            .C_GenerateKey
            .as_ref()
            .map_err(|_| Error::NotSupported)?;
        let mut mechanism = CK_MECHANISM::from(mechanism);
        let mut raw = RawTemplate::new(template, arrays);
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: every pointer is valid for the whole call: the mechanism and its parameters
        // live in `mechanism` and the caller's `Mechanism`; the template's values in `template`,
        // `arrays` and `raw` (which is not moved or changed until the call returns); `handle`
        // is a local. The session handle is cryptoki's, borrowed for the call, so no other
        // thread uses it meanwhile (a `Session` is not `Sync`).
        #[allow(unsafe_code)]
        let rv = unsafe {
            generate(
                session.handle(),
                &mut mechanism,
                raw.as_mut_ptr(),
                raw.len(),
                &mut handle,
            )
        };
        Rv::from(rv).into_result(Function::GenerateKey)?;
        Ok(object_handle(handle))
    }

    /// `C_GenerateKeyPair` with each half's template and array attributes; returns (public,
    /// private).
    pub fn generate_key_pair(
        &self,
        session: &Session,
        mechanism: &Mechanism<'_>,
        public: (&[Attribute], &[(ArrayAttribute, &[Attribute])]),
        private: (&[Attribute], &[(ArrayAttribute, &[Attribute])]),
    ) -> Result<(ObjectHandle, ObjectHandle), Error> {
        let generate = self
            .module
            .C_GenerateKeyPair
            .as_ref()
            .map_err(|_| Error::NotSupported)?;
        let mut mechanism = CK_MECHANISM::from(mechanism);
        let mut public_raw = RawTemplate::new(public.0, public.1);
        let mut private_raw = RawTemplate::new(private.0, private.1);
        let (mut public_handle, mut private_handle): (CK_OBJECT_HANDLE, CK_OBJECT_HANDLE) = (0, 0);
        // SAFETY: as in `generate_key`, for both templates and both handles.
        #[allow(unsafe_code)]
        let rv = unsafe {
            generate(
                session.handle(),
                &mut mechanism,
                public_raw.as_mut_ptr(),
                public_raw.len(),
                private_raw.as_mut_ptr(),
                private_raw.len(),
                &mut public_handle,
                &mut private_handle,
            )
        };
        Rv::from(rv).into_result(Function::GenerateKeyPair)?;
        Ok((object_handle(public_handle), object_handle(private_handle)))
    }

    /// `C_UnwrapKey` of `wrapped` under `unwrapping_key` into an object with `template` and the
    /// array attributes in `arrays`.
    pub fn unwrap_key(
        &self,
        session: &Session,
        mechanism: &Mechanism<'_>,
        unwrapping_key: ObjectHandle,
        wrapped: &[u8],
        template: &[Attribute],
        arrays: &[(ArrayAttribute, &[Attribute])],
    ) -> Result<ObjectHandle, Error> {
        let unwrap = self
            .module
            .C_UnwrapKey
            .as_ref()
            .map_err(|_| Error::NotSupported)?;
        let mut mechanism = CK_MECHANISM::from(mechanism);
        let mut raw = RawTemplate::new(template, arrays);
        let mut wrapped = wrapped.to_vec();
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: as in `generate_key`; `wrapped` is a local copy the module only reads.
        #[allow(unsafe_code)]
        let rv = unsafe {
            unwrap(
                session.handle(),
                &mut mechanism,
                unwrapping_key.handle(),
                wrapped.as_mut_ptr(),
                wrapped.len() as CK_ULONG,
                raw.as_mut_ptr(),
                raw.len(),
                &mut handle,
            )
        };
        Rv::from(rv).into_result(Function::UnwrapKey)?;
        Ok(object_handle(handle))
    }

    /// `C_CreateObject` with `template` and the array attributes in `arrays`.
    pub fn create_object(
        &self,
        session: &Session,
        template: &[Attribute],
        arrays: &[(ArrayAttribute, &[Attribute])],
    ) -> Result<ObjectHandle, Error> {
        let create = self
            .module
            .C_CreateObject
            .as_ref()
            .map_err(|_| Error::NotSupported)?;
        let mut raw = RawTemplate::new(template, arrays);
        let mut handle: CK_OBJECT_HANDLE = 0;
        // SAFETY: as in `generate_key`: the template's values outlive the call and the session
        // is borrowed for it.
        #[allow(unsafe_code)]
        let rv = unsafe { create(session.handle(), raw.as_mut_ptr(), raw.len(), &mut handle) };
        Rv::from(rv).into_result(Function::CreateObject)?;
        Ok(object_handle(handle))
    }

    /// Reads one array attribute of `object`: the attributes it holds, in the module's order.
    /// An object of a class without that attribute is `CKR_ATTRIBUTE_TYPE_INVALID`; one with
    /// an empty template gives an empty list.
    pub fn read(
        &self,
        session: &Session,
        object: ObjectHandle,
        which: ArrayAttribute,
    ) -> Result<Vec<Attribute>, Error> {
        let get = self
            .module
            .C_GetAttributeValue
            .as_ref()
            .map_err(|_| Error::NotSupported)?;
        let call = |outer: &mut CK_ATTRIBUTE| {
            // SAFETY: `outer` is a valid CK_ATTRIBUTE. Its value is either null (the module
            // writes the length) or points at `ulValueLen` bytes of CK_ATTRIBUTE entries whose
            // values are null or point at buffers of their `ulValueLen` bytes, all owned by
            // `read` and unchanged until the call returns.
            #[allow(unsafe_code)]
            let rv = unsafe { get(session.handle(), object.handle(), outer, 1) };
            Rv::from(rv).into_result(Function::GetAttributeValue)
        };
        let size = size_of::<CK_ATTRIBUTE>() as CK_ULONG;
        let unexpected = || Error::Pkcs11(RvError::GeneralError, Function::GetAttributeValue);

        // The array's length in bytes.
        let mut outer = CK_ATTRIBUTE {
            type_: which.code(),
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        call(&mut outer)?;
        let len = outer.ulValueLen;
        if len == CK_UNAVAILABLE_INFORMATION || !len.is_multiple_of(size) || len / size > 1024 {
            return Err(unexpected());
        }
        let count = usize::try_from(len / size).map_err(|_| unexpected())?;
        if count == 0 {
            return Ok(Vec::new());
        }

        // The entries' types and value lengths (PKCS#11 v2.40 section 5.7, C_GetAttributeValue
        // on an attribute array: null values ask for them).
        let empty = CK_ATTRIBUTE {
            type_: 0,
            pValue: ptr::null_mut(),
            ulValueLen: 0,
        };
        let mut entries = vec![empty; count];
        outer.pValue = entries.as_mut_ptr().cast::<c_void>();
        outer.ulValueLen = len;
        call(&mut outer)?;

        // The values.
        let mut values = Vec::with_capacity(count);
        for entry in &entries {
            if entry.ulValueLen == CK_UNAVAILABLE_INFORMATION || entry.ulValueLen > MAX_VALUE_LEN {
                return Err(unexpected());
            }
            let value_len = usize::try_from(entry.ulValueLen).map_err(|_| unexpected())?;
            values.push(vec![0u8; value_len]);
        }
        for (entry, value) in entries.iter_mut().zip(values.iter_mut()) {
            entry.pValue = value.as_mut_ptr().cast::<c_void>();
        }
        outer.pValue = entries.as_mut_ptr().cast::<c_void>();
        outer.ulValueLen = len;
        call(&mut outer)?;
        // Trust no length the module wrote back: each value must still be in its own buffer and
        // fit it, and the attribute is made from that buffer and the checked length.
        entries
            .iter()
            .zip(values.iter_mut())
            .map(|(entry, value)| {
                let written = usize::try_from(entry.ulValueLen).map_err(|_| unexpected())?;
                if entry.ulValueLen == CK_UNAVAILABLE_INFORMATION
                    || written > value.len()
                    || entry.pValue != value.as_mut_ptr().cast::<c_void>()
                {
                    return Err(unexpected());
                }
                Attribute::try_from(CK_ATTRIBUTE {
                    type_: entry.type_,
                    pValue: value.as_mut_ptr().cast::<c_void>(),
                    ulValueLen: entry.ulValueLen,
                })
            })
            .collect()
    }
}

/// A template in the raw layout, with the arrays' entries kept alive beside it. Its entries
/// point into the caller's attributes, which the lifetime keeps borrowed while it lives.
struct RawTemplate<'a> {
    /// The entries of each array attribute; `top` points into them.
    _arrays: Vec<Vec<CK_ATTRIBUTE>>,
    top: Vec<CK_ATTRIBUTE>,
    _borrowed: PhantomData<&'a [Attribute]>,
}

impl<'a> RawTemplate<'a> {
    fn new(template: &'a [Attribute], arrays: &'a [(ArrayAttribute, &'a [Attribute])]) -> Self {
        let mut inner: Vec<Vec<CK_ATTRIBUTE>> = arrays
            .iter()
            .map(|(_, entries)| entries.iter().map(CK_ATTRIBUTE::from).collect())
            .collect();
        let mut top: Vec<CK_ATTRIBUTE> = template.iter().map(CK_ATTRIBUTE::from).collect();
        // The arrays go before a final CKA_MODIFIABLE: SoftHSM applies an unwrap's template in
        // order, and refuses what follows CKA_MODIFIABLE = false.
        let last = match template.last() {
            Some(Attribute::Modifiable(_)) => top.pop(),
            _ => None,
        };
        for ((which, _), entries) in arrays.iter().zip(inner.iter_mut()) {
            top.push(CK_ATTRIBUTE {
                type_: which.code(),
                // The inner vectors' buffers do not move when `inner` itself moves; an empty
                // array is a null value of length 0.
                pValue: if entries.is_empty() {
                    ptr::null_mut()
                } else {
                    entries.as_mut_ptr().cast::<c_void>()
                },
                ulValueLen: (entries.len() * size_of::<CK_ATTRIBUTE>()) as CK_ULONG,
            });
        }
        top.extend(last);
        RawTemplate {
            _arrays: inner,
            top,
            _borrowed: PhantomData,
        }
    }

    fn as_mut_ptr(&mut self) -> *mut CK_ATTRIBUTE {
        self.top.as_mut_ptr()
    }

    fn len(&self) -> CK_ULONG {
        self.top.len() as CK_ULONG
    }
}

fn object_handle(handle: CK_OBJECT_HANDLE) -> ObjectHandle {
    // SAFETY: the module has just returned this handle for an object it created in the
    // caller's session; it is as valid as any handle cryptoki itself returns.
    #[allow(unsafe_code)]
    unsafe {
        ObjectHandle::new_from_raw(handle)
    }
}
