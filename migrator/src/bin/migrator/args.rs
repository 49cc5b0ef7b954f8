//! The command line of `migrator`: clap's argument structs and value parsers, each turned into the plain
//! configuration the library takes.

use std::{net::Ipv4Addr, path::PathBuf, str::FromStr, time::Duration};

use clap::{
    Args,
    builder::{PossibleValuesParser, TypedValueParser},
};
use migevents::Mode;
use migrator::{
    announce::AnnounceSchedule,
    config::{ReceiveConfig, RunConfig},
    engine::{MigrateOptions, OnTimeout},
    transport::Endpoint,
    units::{parse_duration, parse_rate},
    vm::{SerialOutput, VmConfig},
};

/// A value parser that accepts exactly the names of `choices` (and lists them in `--help`).
fn one_of<T: Copy + Send + Sync + 'static>(
    choices: &'static [(&'static str, T)],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(choices.iter().map(|(name, _)| *name)).map(move |name| {
        // The possible-values parser let through only names of `choices`.
        choices
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(choices[0].1, |(_, v)| *v)
    })
}

const MODES: &[(&str, Mode)] = &[("live", Mode::Live), ("quick", Mode::Quick)];
const ON_TIMEOUT: &[(&str, OnTimeout)] = &[("force", OnTimeout::Force), ("abort", OnTimeout::Abort)];

/// A MAC address `aa:bb:cc:dd:ee:ff`, unicast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address like 02:00:00:00:00:01");
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut mac {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "{s} is a multicast MAC address: use a unicast one (even first byte)"
            ));
        }
        Ok(Self(mac))
    }
}

/// An IPv4 address with its prefix, `10.0.0.2/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not an IPv4 address with a prefix, like 10.0.0.2/24");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        if !(1..=32).contains(&prefix_len) {
            return Err(bad());
        }
        Ok(Self { addr, prefix_len })
    }
}

/// Parses a size: bytes, or with a K/M/G suffix (powers of 1024), e.g. `256M`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size like 256M, 1G or 4096");
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        Some(_) => (t, 1),
        None => return Err(bad()),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

/// The dirtier's setting `SIZE@RATE`: rewrite SIZE bytes at RATE bytes per second, e.g. `32M@125M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtySpec {
    pub bytes: u64,
    pub rate: u64,
}

impl FromStr for DirtySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (size, rate) = s.split_once('@').ok_or_else(|| {
            format!("{s:?} is not SIZE@RATE, like 32M@125M (32 MiB rewritten at 125 MiB/s)")
        })?;
        let rate = rate.strip_suffix("/s").unwrap_or(rate);
        Ok(Self {
            bytes: parse_size(size)?,
            rate: parse_size(rate)?,
        })
    }
}

/// `migrator run`.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// The tap device to attach to (it must exist in this network namespace).
    #[arg(long)]
    pub tap: String,
    /// The VM's MAC address.
    #[arg(long)]
    pub mac: MacAddr,
    /// The VM's IPv4 address and prefix, e.g. 10.0.0.2/24.
    #[arg(long)]
    pub ip: Ipv4Cidr,
    /// Default gateway for the guest.
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
    /// Guest RAM (a multiple of 2 MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Memory dirtier: rewrite SIZE at RATE per second, e.g. 32M@125M.
    #[arg(long)]
    pub dirty: Option<DirtySpec>,
    /// Write the guest's serial log to this file instead of stderr.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Control socket for `migrator migrate` and `migrator status`.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Migration events: a unix socket to connect to (migmon watch --events-listen) or a file to append to.
    #[arg(long)]
    pub events: Option<PathBuf>,
}

impl RunArgs {
    pub fn config(&self) -> RunConfig {
        RunConfig {
            vm: VmConfig {
                ram_bytes: self.mem,
                tap: self.tap.clone(),
                mac: self.mac.0,
                ipv4: self.ip.addr,
                prefix_len: self.ip.prefix_len,
                gateway: self.gateway,
                dirty_bytes: self.dirty.map_or(0, |d| d.bytes),
                dirty_rate: self.dirty.map_or(0, |d| d.rate),
                serial: self.serial_log.clone().map_or_else(
                    || SerialOutput::Stderr {
                        prefix: String::new(),
                    },
                    SerialOutput::File,
                ),
            },
            api: self.api.clone(),
            events: self.events.clone(),
        }
    }
}

/// `migrator migrate`: ask a running migrator to move its VM.
#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// The API socket of the source migrator (`run --api` / `receive --api`).
    #[arg(long)]
    pub api: PathBuf,
    /// The destination: tcp:HOST:PORT or unix:PATH (where `migrator receive --listen` waits).
    #[arg(long)]
    pub to: Endpoint,
    #[arg(long, default_value = "live", value_parser = one_of(MODES))]
    pub mode: Mode,
    /// Pause budget of the live switch-over rule.
    #[arg(long, default_value = "30ms", value_parser = parse_duration)]
    pub downtime: Duration,
    /// Cap the stream at this rate (bytes/s; K/M/G = KiB/MiB/GiB), e.g. 125M.
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy gives up converging after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// What to do when pre-copy has not converged by --timeout.
    #[arg(long, default_value = "force", value_parser = one_of(ON_TIMEOUT))]
    pub on_timeout: OnTimeout,
    /// Quick mode: write the suspended state to this file (fsynced) first, then send it.
    #[arg(long)]
    pub via_file: Option<PathBuf>,
    /// Quick mode: hold the guest paused this much longer (reproduces a slow move; the report says so).
    #[arg(long, value_parser = parse_duration)]
    pub extra_pause: Option<Duration>,
    /// Hash all guest RAM at both ends; a mismatch fails the migration.
    #[arg(long)]
    pub verify: bool,
}

impl MigrateArgs {
    pub fn options(&self) -> MigrateOptions {
        MigrateOptions {
            downtime: self.downtime,
            max_bandwidth: self.max_bandwidth,
            timeout: self.timeout,
            on_timeout: self.on_timeout,
            via_file: self.via_file.clone(),
            extra_pause: self.extra_pause.unwrap_or_default(),
            verify: self.verify,
            ..MigrateOptions::new(self.to.clone(), self.mode)
        }
    }
}

/// `migrator status`.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The API socket of a running migrator.
    #[arg(long)]
    pub api: PathBuf,
}

/// The announce schedule of `receive`.
#[derive(Args, Debug, Clone)]
#[expect(
    clippy::struct_field_names,
    reason = "clap names the flags after the fields: --announce-rounds, ..."
)]
pub struct AnnounceArgs {
    /// RARP frames sent after resume.
    #[arg(long, default_value_t = 5)]
    pub announce_rounds: u32,
    /// First gap between RARP frames.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub announce_initial: Duration,
    /// Each later gap grows by this much ...
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub announce_step: Duration,
    /// ... up to this.
    #[arg(long, default_value = "550ms", value_parser = parse_duration)]
    pub announce_max: Duration,
}

impl AnnounceArgs {
    pub fn schedule(&self) -> AnnounceSchedule {
        AnnounceSchedule {
            initial: self.announce_initial,
            max: self.announce_max,
            rounds: self.announce_rounds,
            step: self.announce_step,
        }
    }
}

/// `migrator receive`.
#[derive(Args, Debug, Clone)]
pub struct ReceiveArgs {
    /// The tap device the VM uses here (in the current netns).
    #[arg(long)]
    pub tap: String,
    /// Where to wait for the incoming migration: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub listen: Endpoint,
    /// Control socket, as for `run`, once the VM runs here.
    #[arg(long)]
    pub api: Option<PathBuf>,
    /// Migration events: a unix socket to connect to (migmon --events-listen) or a file to append to.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Give up on a source that stays silent this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    #[command(flatten)]
    pub announce: AnnounceArgs,
}

impl ReceiveArgs {
    pub fn config(&self) -> ReceiveConfig {
        ReceiveConfig {
            tap: self.tap.clone(),
            listen: self.listen.clone(),
            api: self.api.clone(),
            events: self.events.clone(),
            idle_timeout: self.idle_timeout,
            announce: self.announce.schedule(),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use migrator::engine::mac_string;

    use super::*;

    #[test]
    fn parses_cli_values() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999999G").is_err());
        assert_eq!(
            "32M@125M".parse::<DirtySpec>().unwrap(),
            DirtySpec {
                bytes: 32 << 20,
                rate: 125 << 20
            }
        );
        assert_eq!("32M@125M/s".parse::<DirtySpec>().unwrap().rate, 125 << 20);
        assert!("32M".parse::<DirtySpec>().is_err());
        let mac: MacAddr = "02:00:0a:00:00:02".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 10, 0, 0, 2]);
        assert_eq!(mac_string(&mac.0), "02:00:0a:00:00:02");
        assert!("03:00:00:00:00:01".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:01:07".parse::<MacAddr>().is_err());
        let ip: Ipv4Cidr = "10.1.2.3/24".parse().unwrap();
        assert_eq!(ip.addr, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(ip.prefix_len, 24);
        assert!("10.1.2.3".parse::<Ipv4Cidr>().is_err());
        assert!("10.1.2.3/33".parse::<Ipv4Cidr>().is_err());
    }

    #[derive(Parser)]
    struct Migrate {
        #[command(flatten)]
        args: MigrateArgs,
    }

    #[test]
    fn mode_and_on_timeout_are_the_library_types() {
        let m = Migrate::try_parse_from(["m", "--api", "/a", "--to", "unix:/b", "--mode", "quick"]).unwrap();
        let opts = m.args.options();
        assert_eq!(opts.mode, Mode::Quick);
        assert_eq!(opts.on_timeout, OnTimeout::Force);
        let m = Migrate::try_parse_from(["m", "--api", "/a", "--to", "unix:/b", "--on-timeout", "abort"])
            .unwrap();
        assert_eq!(m.args.options().mode, Mode::Live);
        assert_eq!(m.args.options().on_timeout, OnTimeout::Abort);
        let err = Migrate::try_parse_from(["m", "--api", "/a", "--to", "unix:/b", "--mode", "slow"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("live") && err.contains("quick"), "{err}");
    }
}
