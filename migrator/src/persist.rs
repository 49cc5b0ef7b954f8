//! Save and restore of one part of the VM: the [`Persist`] trait, and the framing that makes a saved state safe to
//! read back ([`encode_framed`], [`decode_framed`]).
//!
//! Each live object (`Vcpu`, `MmioTransport`, `NetDevice`, `Serial`) saves into a plain-data `*State` and restores
//! from one, as firecracker's `Persist` does. The aggregate of all of them is [`crate::vm_state::VmState`]; this
//! module knows nothing of it, so a device only depends on this file. A framed blob is
//!
//! ```text
//! offset  size  field
//!      0     8  magic    (chosen by the owner of the blob)
//!      8     4  version  (little endian)
//!     12     4  crc32    (IEEE, of the payload)
//!     16     8  length   (payload bytes, at most the owner's limit)
//!     24     …  payload
//! ```
//!
//! Decoding checks the magic, the version, the length and the checksum before it hands out the payload, and never
//! panics on bad input.

/// Save/restore of one part of the VM.
pub trait Persist {
    /// Plain data: everything needed to rebuild the part on another host.
    type State;
    type Error;
    /// Captures the state (the VM must be paused for it to be consistent).
    fn save(&self) -> Result<Self::State, Self::Error>;
    /// Loads a saved state into a freshly created part.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}

/// Bytes before the payload of a framed blob.
pub const FRAME_HEADER: usize = 24;

/// What a framed blob must look like to be accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub magic: [u8; 8],
    pub version: u32,
    /// Largest payload accepted.
    pub max_payload: u64,
}

/// Errors decoding or encoding a saved VM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the VM state is truncated: {have} bytes, at least {need} needed")]
    Truncated { have: usize, need: usize },
    #[error("the data is not a migrator VM state (bad magic)")]
    BadMagic,
    #[error(
        "the VM state has version {found}, this migrator reads version {expected}: use the same migrator build on both sides"
    )]
    Version { found: u32, expected: u32 },
    #[error("the VM state payload length {length} exceeds the limit {limit}")]
    TooLarge { length: u64, limit: u64 },
    #[error("the VM state has {extra} trailing bytes after its payload")]
    TrailingBytes { extra: usize },
    #[error("the VM state is corrupted: checksum {found:#010x}, expected {expected:#010x}")]
    Checksum { expected: u32, found: u32 },
    #[error("cannot parse the VM state payload")]
    Parse(#[source] serde_json::Error),
    #[error("cannot serialize the VM state")]
    Serialize(#[source] serde_json::Error),
}

/// Frames `payload`: magic, version, checksum and length in front of it.
pub fn encode_framed(framing: &Framing, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_HEADER + payload.len());
    out.extend_from_slice(&framing.magic);
    out.extend_from_slice(&framing.version.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a blob made by [`encode_framed`], after checking magic, version, length and checksum.
pub fn decode_framed<'a>(framing: &Framing, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
    let header: &[u8; FRAME_HEADER] =
        bytes
            .get(..FRAME_HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or(StateError::Truncated {
                have: bytes.len(),
                need: FRAME_HEADER,
            })?;
    if header[0..8] != framing.magic {
        return Err(StateError::BadMagic);
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != framing.version {
        return Err(StateError::Version {
            found: version,
            expected: framing.version,
        });
    }
    let expected = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let length = u64::from_le_bytes(len_bytes);
    if length > framing.max_payload {
        return Err(StateError::TooLarge {
            length,
            limit: framing.max_payload,
        });
    }
    let need = FRAME_HEADER + length as usize;
    let payload = bytes.get(FRAME_HEADER..need).ok_or(StateError::Truncated {
        have: bytes.len(),
        need,
    })?;
    if bytes.len() > need {
        return Err(StateError::TrailingBytes {
            extra: bytes.len() - need,
        });
    }
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(StateError::Checksum { expected, found });
    }
    Ok(payload)
}
