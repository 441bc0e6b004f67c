//! What the embedded CA offers its CMP server: issuance from a certificate template.
