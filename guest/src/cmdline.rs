//! The kernel command line of the PVH boot path (QEMU `-M microvm -kernel guest -append "..."`).
//!
//! Recognised words (others, such as QEMU's `console=`, are ignored):
//! - `virtio_mmio.device=<size>@<base>:<irq>` (QEMU appends it): the virtio-mmio window, e.g. `512@0xfeb00e00:12`;
//! - `ip=<a.b.c.d>/<prefix>`; `gw=<a.b.c.d>`; `mac=<xx:xx:xx:xx:xx:xx>` (default: the device's MAC);
//! - `ip6=<ipv6 address>/<prefix>`, e.g. `ip6=fd00:77::10/64` (the link-local address is always there);
//! - `dirty=<bytes>@<bytes per second>` with optional `K`/`M`/`G` suffixes (binary), e.g. `dirty=32M@125M`;
//! - `tsc_khz=<n>` to skip the TSC calibration;
//! - `idle=poll` to idle in a `pause` loop instead of `sti; hlt` (costs a host CPU; for comparisons).

/// What the command line said. Absent words stay `None` / zero.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// virtio-mmio window: base, size, IRQ.
    pub virtio_mmio: Option<(u64, u64, u32)>,
    pub ip: Option<([u8; 4], u8)>,
    pub ip6: Option<([u8; 16], u8)>,
    pub gateway: Option<[u8; 4]>,
    pub mac: Option<[u8; 6]>,
    pub dirty_bytes: u64,
    pub dirty_rate: u64,
    pub tsc_khz: Option<u64>,
    /// `idle=poll`: spin instead of halting when idle.
    pub idle_poll: bool,
}

/// A word the guest recognises but could not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadWord<'a>(pub &'a str);

impl Cmdline {
    /// Parses a command line. A malformed recognised word is an error (the guest would run misconfigured).
    pub fn parse(line: &str) -> Result<Self, BadWord<'_>> {
        let mut out = Self::default();
        for word in line.split_ascii_whitespace() {
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            let bad = || BadWord(word);
            match key {
                "virtio_mmio.device" => {
                    let (size, rest) = value.split_once('@').ok_or_else(bad)?;
                    let (base, irq) = rest.split_once(':').ok_or_else(bad)?;
                    let irq = irq.parse().map_err(|_| bad())?;
                    // The first device wins (the guest drives one NIC).
                    if out.virtio_mmio.is_none() {
                        out.virtio_mmio = Some((
                            parse_number(base).ok_or_else(bad)?,
                            parse_size(size).ok_or_else(bad)?,
                            irq,
                        ));
                    }
                }
                "ip" => {
                    let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
                    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                    if prefix > 32 {
                        return Err(bad());
                    }
                    out.ip = Some((parse_ipv4(addr).ok_or_else(bad)?, prefix));
                }
                "ip6" => {
                    let (addr, prefix) = value.split_once('/').ok_or_else(bad)?;
                    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
                    let addr: core::net::Ipv6Addr = addr.parse().map_err(|_| bad())?;
                    if prefix == 0 || prefix > 128 || addr.is_unspecified() || addr.is_multicast() {
                        return Err(bad());
                    }
                    out.ip6 = Some((addr.octets(), prefix));
                }
                "gw" => out.gateway = Some(parse_ipv4(value).ok_or_else(bad)?),
                "mac" => out.mac = Some(parse_mac(value).ok_or_else(bad)?),
                "dirty" => {
                    let (bytes, rate) = value.split_once('@').ok_or_else(bad)?;
                    out.dirty_bytes = parse_size(bytes).ok_or_else(bad)?;
                    out.dirty_rate = parse_size(rate).ok_or_else(bad)?;
                }
                "tsc_khz" => out.tsc_khz = Some(value.parse().map_err(|_| bad())?),
                "idle" => match value {
                    "poll" => out.idle_poll = true,
                    "halt" => out.idle_poll = false,
                    _ => return Err(bad()),
                },
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Decimal or `0x` hexadecimal.
fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A number with an optional binary `K`, `M` or `G` suffix.
fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    parse_number(digits)?.checked_mul(1u64 << shift)
}

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for byte in &mut out {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_and_own_words() {
        let c = Cmdline::parse(
            "console=ttyS0 virtio_mmio.device=512@0xfeb00e00:12 ip=10.9.0.2/24 gw=10.9.0.1 ip6=fd00:9::2/64 \
             mac=52:54:00:ab:cd:ef dirty=32M@125M tsc_khz=2400000 virtio_mmio.device=512@0xfeb00c00:11 idle=poll",
        )
        .unwrap();
        assert_eq!(c.virtio_mmio, Some((0xfeb0_0e00, 512, 12)));
        assert_eq!(c.ip, Some(([10, 9, 0, 2], 24)));
        assert_eq!(c.gateway, Some([10, 9, 0, 1]));
        assert_eq!(
            c.ip6,
            Some(([0xfd, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 64))
        );
        assert_eq!(c.mac, Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef]));
        assert_eq!((c.dirty_bytes, c.dirty_rate), (32 << 20, 125 << 20));
        assert_eq!(c.tsc_khz, Some(2_400_000));
        assert!(c.idle_poll);
    }

    #[test]
    fn empty_and_unknown_words() {
        assert_eq!(Cmdline::parse("").unwrap(), Cmdline::default());
        assert_eq!(Cmdline::parse("quiet foo=bar").unwrap(), Cmdline::default());
    }

    #[test]
    fn malformed_words_are_errors() {
        for bad in [
            "ip=10.0.0.300/24",
            "ip=10.0.0.1",
            "ip=10.0.0.1/33",
            "mac=52:54:00",
            "dirty=1M",
            "gw=1.2.3",
            "ip6=fd00::1",
            "ip6=fd00::1/129",
            "ip6=fd00::zz/64",
            "ip6=::/64",
            "ip6=ff02::1/64",
        ] {
            assert_eq!(Cmdline::parse(bad), Err(BadWord(bad)), "{bad}");
        }
        assert!(Cmdline::parse("virtio_mmio.device=512@0xzz:1").is_err());
        assert!(Cmdline::parse("dirty=99999999999G@1").is_err());
    }
}
