//! `migrator run`: boot the embedded guest on a tap and serve it until Ctrl-C or until the guest stops.
//!
//! The pieces are public so that other subcommands (and the API server) can compose them:
//! [`Shutdown::install`] (before any thread starts), [`RunArgs::vm_config`], [`boot`], then [`Shutdown::wait`].

use std::{
    fmt,
    net::Ipv4Addr,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use guest_abi::GuestMark;

use crate::{
    vcpu::{GuestExit, GuestStatus},
    vm::{SerialOutput, Vm, VmConfig},
};

/// A MAC address `aa:bb:cc:dd:ee:ff`.
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

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
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

/// Options of `migrator run`.
#[derive(clap::Args, Clone, Debug)]
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
}

impl RunArgs {
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
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
        }
    }
}

/// Why `run` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// SIGINT or SIGTERM.
    Signal(i32),
    /// The guest stopped.
    Guest(GuestExit),
    /// Another part of the program asked to stop.
    Requested,
}

/// Ctrl-C / SIGTERM handling and the wait for the end of a run.
#[derive(Clone, Debug)]
pub struct Shutdown {
    inner: Arc<(Mutex<Option<EndReason>>, Condvar)>,
}

impl Shutdown {
    /// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after) and turns them into an end
    /// reason on a dedicated thread. Call it before starting the VM.
    pub fn install() -> Result<Self> {
        let shutdown = Self {
            inner: Arc::new((Mutex::new(None), Condvar::new())),
        };
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
        }
        // SAFETY: `set` is initialised; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        if rc != 0 {
            bail!("cannot block SIGINT/SIGTERM (error {rc})");
        }
        let s = shutdown.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and blocked in this thread (inherited); `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&raw const set, &raw mut sig) } == 0 {
                    s.end(EndReason::Signal(sig));
                }
            })
            .context("cannot start the signal thread")?;
        Ok(shutdown)
    }

    /// Records the end reason (the first one wins) and wakes [`Shutdown::wait`].
    pub fn end(&self, reason: EndReason) {
        let (m, c) = &*self.inner;
        m.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
        c.notify_all();
    }

    /// Waits for a signal, [`Shutdown::end`], or the guest to stop.
    pub fn wait(&self, guest: &Arc<GuestStatus>) -> EndReason {
        let me = self.clone();
        let status = Arc::clone(guest);
        // The watcher ends with the process; a guest that never stops leaves it parked, which costs nothing.
        let _ = std::thread::Builder::new()
            .name("guest-exit".into())
            .spawn(move || {
                if let Some(exit) = status.wait_exit(None) {
                    me.end(EndReason::Guest(exit));
                }
            });
        let (m, c) = &*self.inner;
        let mut r = m.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(reason) = r.clone() {
                return reason;
            }
            r = c.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Creates and starts the VM, and reports on stderr when the guest is ready.
pub fn boot(config: &VmConfig) -> Result<Vm> {
    let t0 = Instant::now();
    let mut vm = Vm::create(config).with_context(|| {
        format!(
            "cannot create the VM ({} MiB RAM, tap {})",
            config.ram_bytes >> 20,
            config.tap
        )
    })?;
    vm.start().context("cannot start the VM")?;
    let status = vm.guest_status();
    let mac = MacAddr(config.mac);
    let ip = config.ipv4;
    let _ = std::thread::Builder::new().name("ready".into()).spawn(move || {
        if status
            .wait_mark(GuestMark::Ready, 1, Duration::from_secs(120))
            .is_ok()
        {
            eprintln!(
                "migrator: guest {mac} {ip} ready after {} ms",
                t0.elapsed().as_millis()
            );
        }
    });
    Ok(vm)
}

/// `migrator run`.
pub fn run(args: &RunArgs) -> Result<()> {
    let shutdown = Shutdown::install()?;
    let vm = boot(&args.vm_config())?;
    eprintln!(
        "migrator: running guest {} {}/{} on tap {} with {} MiB; Ctrl-C stops it",
        args.mac,
        args.ip.addr,
        args.ip.prefix_len,
        args.tap,
        args.mem >> 20
    );
    let reason = shutdown.wait(&vm.guest_status());
    vm.shutdown();
    match reason {
        EndReason::Signal(_) | EndReason::Requested | EndReason::Guest(GuestExit::Status(0)) => Ok(()),
        EndReason::Guest(GuestExit::Status(n)) => {
            bail!("the guest stopped with status {n} (a guest panic: see its log)")
        }
        EndReason::Guest(GuestExit::Crashed(why)) => bail!("the guest crashed: {why}"),
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(mac.to_string(), "02:00:0a:00:00:02");
        assert!("03:00:00:00:00:01".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00".parse::<MacAddr>().is_err());
        assert!("02:00:00:00:00:01:07".parse::<MacAddr>().is_err());
        let ip: Ipv4Cidr = "10.1.2.3/24".parse().unwrap();
        assert_eq!(ip.addr, Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(ip.prefix_len, 24);
        assert!("10.1.2.3".parse::<Ipv4Cidr>().is_err());
        assert!("10.1.2.3/33".parse::<Ipv4Cidr>().is_err());
    }
}
