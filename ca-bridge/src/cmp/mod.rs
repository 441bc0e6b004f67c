//! CMP (RFC 9483 lightweight profile over HTTP, RFC 6712): the client, and the server side of
//! the embedded CA.
