//! CMP (RFC 9483 lightweight profile over HTTP, RFC 6712): the client, and the server side of
//! the embedded CA.
//!
//! Both sides use the `cmpv2`/`crmf` message types, except where those are wrong on the wire:
//! failInfo bits are written and read here (cmpv2 0.2 uses bit numbers as masks), a template's
//! OptionalValidity is written and read here (crmf 0.2 holds it as an X.509 `Validity`), and
//! protection is checked over the received header and body bytes, never a re-encoding.
//! Protection is either a signature (ecdsa-with-SHA256 by our own keys; ECDSA P-256/P-384 and
//! RSA PKCS#1 v1.5 SHA-256 verified) or a password-based MAC (PBM, RFC 4210 section 5.1.3.1,
//! SHA-256 and HMAC-SHA-256; HMAC-SHA1, OpenSSL's default, is accepted in received messages).
//!
//! Who the server accepts: PBM with a configured reference and secret, or a signature by a
//! certificate of the issuing CA that is valid now and either carries id-kp-cmcRA (an RA: ir,
//! cr, kur naming the old certificate in oldCertID, rr) or is a good subscriber certificate
//! (kur of itself, rr of itself). certConf must come from the requester of the transaction.
//!
//! A message that does not parse or whose protection does not verify gets an unprotected error
//! message (RFC 9483 section 3.6.4): nothing is asked of the HSM before the sender is
//! authenticated.
//!
//! Not supported: implicit confirmation, polling, nested messages, and more than one
//! certificate request per message.

mod client;
mod message;
mod pbm;
mod server;

pub use client::{ClientProtection, CmpClient, CmpClientConfig, Unconfirmed};
pub use server::{CmpServer, CmpServerConfig};

#[cfg(feature = "fuzzing")]
pub(crate) use client::fuzz_response;
