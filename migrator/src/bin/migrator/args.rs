//! The command line of `migrator`: clap's argument structs and value parsers, each turned into the plain
//! configuration the library takes.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use clap::{
    Args,
    builder::{PossibleValuesParser, TypedValueParser},
};
use migevents::Mode;
use migmon_base::{
    MacAddr, MacParseError,
    units::{parse_duration, parse_rate, parse_size},
};
use migrator::{
    announce::AnnounceSchedule,
    config::{ReceiveConfig, RunConfig},
    engine::{MigrateOptions, OnTimeout},
    transport::{ClientTls, Endpoint},
    vm::{SerialOutput, VmConfig},
};

/// `path` made absolute (the migrator that uses it may run in another directory).
fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// `migrator tls-init`.
#[derive(Args, Debug, Clone)]
pub struct TlsInitArgs {
    /// Where to write ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem and client-key.pem.
    pub dir: PathBuf,
    /// A DNS name or IP address the destination's certificate is valid for (repeatable; localhost and 127.0.0.1
    /// are always in).
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
}

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

/// `--mac`: a MAC address that a VM can own (unicast: the group bit of the first octet clear).
fn parse_vm_mac(s: &str) -> Result<MacAddr, String> {
    let mac: MacAddr = s.parse().map_err(|e: MacParseError| e.to_string())?;
    if mac.is_multicast() {
        return Err(format!(
            "{s} is a multicast MAC address: use a unicast one (even first byte)"
        ));
    }
    Ok(mac)
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

/// An IPv6 address with its prefix, `fd00:77::10/64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Cidr {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
}

impl FromStr for Ipv6Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a unicast IPv6 address with a prefix, like fd00:77::10/64");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
        let prefix_len: u8 = len.parse().map_err(|_| bad())?;
        if !(1..=128).contains(&prefix_len) || addr.is_unspecified() || addr.is_multicast() {
            return Err(bad());
        }
        Ok(Self { addr, prefix_len })
    }
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
        Ok(Self {
            bytes: parse_size(size).map_err(|e| e.to_string())?,
            rate: parse_rate(rate).map_err(|e| e.to_string())?,
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
    #[arg(long, value_parser = parse_vm_mac)]
    pub mac: MacAddr,
    /// The VM's IPv4 address and prefix, e.g. 10.0.0.2/24.
    #[arg(long)]
    pub ip: Ipv4Cidr,
    /// Default gateway for the guest.
    #[arg(long)]
    pub gateway: Option<Ipv4Addr>,
    /// The VM's IPv6 address and prefix, e.g. `fd00:77::10/64` (it has a link-local address from its MAC anyway).
    #[arg(long)]
    pub ip6: Option<Ipv6Cidr>,
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
                ipv6: self.ip6.map(|c| (c.addr, c.prefix_len)),
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
    /// Cap the stream at this rate, e.g. 125MiB/s or 125M (binary units: M = MiB).
    #[arg(long, value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy gives up converging after this long; a stream that makes no progress this long (1 s to 30 s)
    /// ends the migration.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The switch-over's deadline: a destination not ready this long after the pause gets the guest resumed here
    /// within it. Default: live, max(10 x --downtime, 1s); quick, none.
    #[arg(long, value_parser = parse_duration)]
    pub max_pause: Option<Duration>,
    /// What to do when pre-copy has not converged by --timeout.
    #[arg(long, default_value = "force", value_parser = one_of(ON_TIMEOUT))]
    pub on_timeout: OnTimeout,
    /// Quick mode: write the suspended state to this file (fsynced) first, then send it. The file must not exist:
    /// it is created mode 0600, never through a link, and removed once the migration succeeded.
    #[arg(long)]
    pub via_file: Option<PathBuf>,
    /// Quick mode: hold the guest paused this much longer (reproduces a slow move; the report says so).
    #[arg(long, value_parser = parse_duration)]
    pub extra_pause: Option<Duration>,
    /// Hash all guest RAM at both ends; a mismatch fails the migration.
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub security: ClientSecurityArgs,
}

/// How the source reaches a `tcp:` destination.
#[derive(Args, Debug, Clone)]
pub struct ClientSecurityArgs {
    /// Mutual TLS with the credentials in DIR (QEMU's tls-creds-x509 layout: ca-cert.pem, client-cert.pem,
    /// client-key.pem; see `migrator tls-init`). Required for tcp: unless --insecure.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of --to), as QEMU's tls-hostname.
    #[arg(long, requires = "tls_creds")]
    pub tls_hostname: Option<String>,
    /// Send over plain TCP: guest memory unencrypted and the destination unauthenticated.
    #[arg(long, conflicts_with = "tls_creds")]
    pub insecure: bool,
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
            tls: self.security.tls_creds.as_ref().map(|creds| ClientTls {
                creds: absolute(creds),
                hostname: self.security.tls_hostname.clone(),
            }),
            insecure: self.security.insecure,
            max_pause: self.max_pause,
            ..MigrateOptions::new(self.to.clone(), self.mode)
        }
    }
}

/// `migrator resume`.
#[derive(Args, Debug, Clone)]
pub struct ResumeArgs {
    /// The API socket of the migrator that holds the in-doubt guest.
    #[arg(long)]
    pub api: PathBuf,
    /// Confirm that the guest runs on no other side (required).
    #[arg(long)]
    pub force: bool,
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
    /// Give up when no authenticated source has arrived, or a source has stayed silent, this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Mutual TLS with the credentials in DIR (QEMU's tls-creds-x509 layout: ca-cert.pem, server-cert.pem,
    /// server-key.pem; see `migrator tls-init`). Required for tcp: unless --insecure.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Accept plain TCP: guest memory unencrypted and the source unauthenticated.
    #[arg(long, conflicts_with = "tls_creds")]
    pub insecure: bool,
    /// Refuse a source whose guest RAM is larger than this.
    #[arg(long, default_value = "4GiB", value_parser = parse_size)]
    pub max_mem: u64,
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
            tls_creds: self.tls_creds.as_deref().map(absolute),
            insecure: self.insecure,
            max_mem: self.max_mem,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn parses_cli_values() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(
            parse_size("32MiB").unwrap(),
            32 << 20,
            "binary units in every spelling"
        );
        let bare = parse_size("4096").unwrap_err().to_string();
        assert!(bare.contains("needs a unit"), "a bare number is refused: {bare}");
        assert_eq!(
            "32M@125M".parse::<DirtySpec>().unwrap(),
            DirtySpec {
                bytes: 32 << 20,
                rate: 125 << 20
            }
        );
        assert_eq!("32MiB@125M/s".parse::<DirtySpec>().unwrap().rate, 125 << 20);
        assert!("32M".parse::<DirtySpec>().is_err());
        assert!("32@125M".parse::<DirtySpec>().is_err());
        let mac = parse_vm_mac("02:00:0a:00:00:02").unwrap();
        assert_eq!(mac.0, [2, 0, 10, 0, 0, 2]);
        assert_eq!(mac.to_string(), "02:00:0a:00:00:02");
        assert!(
            parse_vm_mac("03:00:00:00:00:01")
                .unwrap_err()
                .contains("multicast")
        );
        assert!(parse_vm_mac("02:00:00:00:00").is_err());
        assert!(parse_vm_mac("02:00:00:00:00:01:07").is_err());
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
