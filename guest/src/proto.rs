//! Byte-level encodings of the stream and request/response services (see `guest_abi`).

use guest_abi::{RR_MAX_RESPONSE, STREAM_RECORD};

/// Fills `buf` with the stream service's bytes starting at byte `offset` of the (infinite) stream.
///
/// Record `n` occupies bytes `[n * STREAM_RECORD, (n + 1) * STREAM_RECORD)`: `n` as a big-endian `u64`, then
/// `STREAM_RECORD - 8` bytes equal to `n as u8`.
pub fn fill_stream(buf: &mut [u8], offset: u64) {
    let record = STREAM_RECORD as u64;
    let mut n = offset / record;
    let mut at = (offset % record) as usize;
    let mut rest = buf;
    while !rest.is_empty() {
        let header = n.to_be_bytes();
        let take = (STREAM_RECORD - at).min(rest.len());
        let (chunk, tail) = rest.split_at_mut(take);
        for (i, byte) in chunk.iter_mut().enumerate() {
            let pos = at + i;
            *byte = if pos < 8 { header[pos] } else { n as u8 };
        }
        rest = tail;
        at = 0;
        n += 1;
    }
}

/// A request/response request that failed to parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RrError {
    /// The requested response is longer than `RR_MAX_RESPONSE`.
    TooLong(u32),
}

/// One request of the request/response service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RrRequest {
    pub seq: u32,
    pub len: u32,
}

impl RrRequest {
    /// Wire size of a request.
    pub const SIZE: usize = 8;

    /// Decodes a request: big-endian sequence number, then big-endian response length.
    pub fn parse(bytes: [u8; Self::SIZE]) -> Result<Self, RrError> {
        let seq = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len > RR_MAX_RESPONSE {
            return Err(RrError::TooLong(len));
        }
        Ok(Self { seq, len })
    }

    /// Bytes in the response: the sequence number, then `len` filler bytes.
    pub fn response_len(self) -> usize {
        4 + self.len as usize
    }

    /// Fills `buf` with the response's bytes starting at byte `offset` of the response.
    pub fn fill_response(self, buf: &mut [u8], offset: usize) {
        let seq = self.seq.to_be_bytes();
        for (i, byte) in buf.iter_mut().enumerate() {
            let pos = offset + i;
            *byte = if pos < 4 { seq[pos] } else { self.seq as u8 };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::vec;

    use super::*;

    #[test]
    fn stream_records_in_one_piece() {
        let mut buf = vec![0u8; STREAM_RECORD * 3];
        fill_stream(&mut buf, 0);
        for (n, rec) in buf.chunks(STREAM_RECORD).enumerate() {
            assert_eq!(u64::from_be_bytes(rec[..8].try_into().unwrap()), n as u64);
            assert!(rec[8..].iter().all(|&b| b == n as u8));
        }
    }

    #[test]
    fn stream_split_at_odd_offsets_matches_whole() {
        let mut whole = vec![0u8; 1000];
        fill_stream(&mut whole, 300 * STREAM_RECORD as u64);
        let mut pieces = vec![0u8; 1000];
        let mut at = 0;
        for step in [1usize, 3, 7, 64, 65, 100, 5, 755] {
            let end = (at + step).min(pieces.len());
            fill_stream(&mut pieces[at..end], 300 * STREAM_RECORD as u64 + at as u64);
            at = end;
        }
        assert_eq!(at, 1000);
        assert_eq!(whole, pieces);
        assert_eq!(u64::from_be_bytes(whole[..8].try_into().unwrap()), 300);
        assert_eq!(whole[8], 300u64 as u8);
    }

    #[test]
    fn rr_parse_and_fill() {
        let req = RrRequest::parse([0, 0, 1, 2, 0, 0, 0, 5]).unwrap();
        assert_eq!(req, RrRequest { seq: 0x102, len: 5 });
        assert_eq!(req.response_len(), 9);
        let mut resp = [0u8; 9];
        req.fill_response(&mut resp[..3], 0);
        req.fill_response(&mut resp[3..], 3);
        assert_eq!(resp, [0, 0, 1, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn rr_rejects_oversized_response() {
        let too_long = (RR_MAX_RESPONSE + 1).to_be_bytes();
        let req = [0, 0, 0, 1, too_long[0], too_long[1], too_long[2], too_long[3]];
        assert_eq!(RrRequest::parse(req), Err(RrError::TooLong(RR_MAX_RESPONSE + 1)));
    }
}
