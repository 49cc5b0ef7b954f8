//! The self-announce after resume: RARP frames in QEMU's exact format on QEMU's schedule, plus a request to the
//! guest for a gratuitous ARP.
//!
//! RARP only moves the L2 forwarding entries of the bridges between the VM and its peers (they learn the source MAC
//! on the new port). Peers' ARP caches are refreshed only by the guest's own gratuitous ARP, which is why both are
//! sent.
//!
//! The frame (60 bytes): destination `ff:ff:ff:ff:ff:ff`, source = VM MAC, ethertype 0x8035, then htype 1, ptype
//! 0x0800, hlen 6, plen 4, op 3 (reverse request), sha = tha = VM MAC, spa = tpa = 0.0.0.0, then zero padding to 60.
//!
//! The schedule: the first frame at once, then gap `k` (k = 1, 2, ...) is `initial + (k - 1) * step`, capped at
//! `max`. QEMU's defaults `initial` 50 ms, `max` 550 ms, `rounds` 5, `step` 100 ms give 0, 50, 200, 450, 800 ms.

use std::time::Duration;

/// Ethertype of RARP.
pub const ETH_P_RARP: u16 = 0x8035;
/// Length of the announce frame.
pub const RARP_FRAME_LEN: usize = 60;

/// The announce frame for `mac`.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; RARP_FRAME_LEN] {
    let mut f = [0u8; RARP_FRAME_LEN];
    f[0..6].fill(0xff);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // htype: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // ptype: IPv4
    f[18] = 6; // hlen
    f[19] = 4; // plen
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // op: reverse request
    f[22..28].copy_from_slice(&mac); // sha
    // spa 28..32 = 0
    f[32..38].copy_from_slice(&mac); // tha
    // tpa 38..42 = 0, padding to 60 = 0
    f
}

/// When to send the announce frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceSchedule {
    pub initial: Duration,
    pub max: Duration,
    pub rounds: u32,
    pub step: Duration,
}

impl Default for AnnounceSchedule {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(550),
            rounds: 5,
            step: Duration::from_millis(100),
        }
    }
}

impl AnnounceSchedule {
    /// Offsets from resume at which frame 0, 1, ... go out.
    pub fn offsets(&self) -> Vec<Duration> {
        let mut out = Vec::with_capacity(self.rounds as usize);
        let mut at = Duration::ZERO;
        for k in 0..self.rounds {
            if k > 0 {
                let gap = self.initial + self.step * (k - 1);
                at += gap.min(self.max);
            }
            out.push(at);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_is_qemus() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        let want: [u8; 60] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src
            0x80, 0x35, // ethertype RARP
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x03, // htype, ptype, hlen, plen, op
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // sha, spa
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0, 0, 0, 0, // tha, tpa
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // padding
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn default_schedule_is_qemus() {
        let ms: Vec<u128> = AnnounceSchedule::default()
            .offsets()
            .iter()
            .map(Duration::as_millis)
            .collect();
        assert_eq!(ms, vec![0, 50, 200, 450, 800]);
    }

    #[test]
    fn schedule_caps_gaps() {
        let s = AnnounceSchedule {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(25),
            rounds: 5,
            step: Duration::from_millis(10),
        };
        let ms: Vec<u128> = s.offsets().iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![0, 10, 30, 55, 80]);
        assert!(AnnounceSchedule { rounds: 0, ..s }.offsets().is_empty());
    }
}
