//! Tracepoint record layouts from tracefs `format` files.
//!
//! Tracepoint layouts change between kernels (`tcp:tcp_retransmit_skb` did in 2025, `tcp:tcp_send_reset` switched
//! to `sockaddr` fields in 6.10). migmon reads each `format` file at start-up, hands the field offsets to the kernel
//! programs, and refuses to run, naming the field, when one it needs is missing.

use std::path::{Path, PathBuf};

use monitor_common::{FdbLayout, NO_FIELD, TP_SOCKADDR, TpLayout};

/// Errors finding tracefs or reading a format.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and could not be mounted at /sys/kernel/tracing: mount it with \
         `mount -t tracefs nodev /sys/kernel/tracing` (note: `ip netns exec` hides it; run migmon in the root namespace)"
    )]
    Missing(#[source] std::io::Error),
    #[error("cannot read the format of tracepoint {event} ({path}): this kernel lacks the tracepoint")]
    ReadFormat {
        event: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint {event} has no field `{field}` on this kernel; migmon cannot read it")]
    MissingField { event: String, field: String },
    #[error("tracepoint {event}: field `{field}` is at offset {offset}, beyond what migmon can address")]
    FieldOffset {
        event: String,
        field: String,
        offset: usize,
    },
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    /// The declared C type, e.g. `__u8 saddr[4]` gives `__u8`.
    pub ctype: String,
    pub offset: usize,
    pub size: usize,
}

/// A parsed `format` file.
#[derive(Clone, Debug)]
pub struct Format {
    /// `category:name`.
    pub event: String,
    pub fields: Vec<Field>,
}

impl Format {
    /// Parses the text of a `format` file.
    pub fn parse(event: &str, text: &str) -> Self {
        let fields = text
            .lines()
            .filter_map(|line| {
                let line = line.trim();
                let decl = line.strip_prefix("field:")?;
                let mut parts = decl.split(';').map(str::trim);
                let decl = parts.next()?;
                let mut offset = None;
                let mut size = None;
                for p in parts {
                    if let Some(v) = p.strip_prefix("offset:") {
                        offset = v.parse().ok();
                    } else if let Some(v) = p.strip_prefix("size:") {
                        size = v.parse().ok();
                    }
                }
                // "const void * skaddr", "__u8 saddr[4]", "__data_loc char[] br_dev"
                let decl = match decl.strip_suffix(']') {
                    Some(d) => d.rsplit_once('[')?.0.trim_end(),
                    None => decl,
                };
                let name_start = decl.rfind([' ', '*'])? + 1;
                let name = decl[name_start..].to_owned();
                let ctype = decl[..name_start].trim().to_owned();
                Some(Field {
                    name,
                    ctype,
                    offset: offset?,
                    size: size?,
                })
            })
            .collect();
        Self {
            event: event.to_owned(),
            fields,
        }
    }

    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Offset of an optional field ([`NO_FIELD`] if absent).
    pub fn offset(&self, name: &str) -> Result<u16, TracefsError> {
        match self.field(name) {
            None => Ok(NO_FIELD),
            Some(f) => u16::try_from(f.offset)
                .ok()
                .filter(|&o| o != NO_FIELD)
                .ok_or_else(|| TracefsError::FieldOffset {
                    event: self.event.clone(),
                    field: name.to_owned(),
                    offset: f.offset,
                }),
        }
    }

    /// Offset of a field the probe cannot do without.
    pub fn require(&self, name: &str) -> Result<u16, TracefsError> {
        if self.field(name).is_none() {
            return Err(TracefsError::MissingField {
                event: self.event.clone(),
                field: name.to_owned(),
            });
        }
        self.offset(name)
    }
}

/// Where tracefs is, mounting it at `/sys/kernel/tracing` when it is not mounted anywhere (needs root).
pub fn root() -> Result<PathBuf, TracefsError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = Path::new("/sys/kernel/tracing");
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| TracefsError::Missing(e.into()))?;
    if target.join("events").is_dir() {
        Ok(target.to_owned())
    } else {
        Err(TracefsError::Missing(std::io::Error::from(
            std::io::ErrorKind::NotFound,
        )))
    }
}

/// Reads and parses `events/<category>/<name>/format`.
pub fn read_format(root: &Path, category: &str, name: &str) -> Result<Format, TracefsError> {
    let event = format!("{category}:{name}");
    let path = root.join("events").join(category).join(name).join("format");
    let text = std::fs::read_to_string(&path).map_err(|source| TracefsError::ReadFormat {
        event: event.clone(),
        path: path.clone(),
        source,
    })?;
    Ok(Format::parse(&event, &text))
}

/// The 4-tuple fields: `family`, `sport`, `dport`, `saddr`, `daddr`, `saddr_v6`, `daddr_v6` (all required), or, for
/// `tcp_send_reset` since 6.10, `saddr`/`daddr` as 28-byte sockaddrs.
fn tuple_layout(f: &Format, l: &mut TpLayout) -> Result<(), TracefsError> {
    if f.field("family").is_none()
        && f.field("saddr").is_some_and(|s| s.size >= 28)
        && f.field("daddr").is_some_and(|d| d.size >= 28)
    {
        l.flags |= TP_SOCKADDR;
        l.saddr = f.require("saddr")?;
        l.daddr = f.require("daddr")?;
        return Ok(());
    }
    l.family = f.require("family")?;
    l.sport = f.require("sport")?;
    l.dport = f.require("dport")?;
    l.saddr = f.require("saddr")?;
    l.daddr = f.require("daddr")?;
    l.saddr_v6 = f.require("saddr_v6")?;
    l.daddr_v6 = f.require("daddr_v6")?;
    Ok(())
}

/// `tcp:tcp_retransmit_skb`: tuple, `skaddr` and `state` required.
pub fn retransmit_layout(f: &Format) -> Result<TpLayout, TracefsError> {
    let mut l = TpLayout::EMPTY;
    tuple_layout(f, &mut l)?;
    l.skaddr = f.require("skaddr")?;
    l.state = f.require("state")?;
    Ok(l)
}

/// `sock:inet_sock_set_state`: tuple, `skaddr`, `oldstate`, `newstate`, `protocol`.
pub fn set_state_layout(f: &Format) -> Result<TpLayout, TracefsError> {
    let mut l = TpLayout::EMPTY;
    tuple_layout(f, &mut l)?;
    l.skaddr = f.require("skaddr")?;
    l.oldstate = f.require("oldstate")?;
    l.newstate = f.require("newstate")?;
    l.protocol = f.require("protocol")?;
    Ok(l)
}

/// `sock:inet_sk_error_report`: tuple, `error`, `protocol`.
pub fn error_report_layout(f: &Format) -> Result<TpLayout, TracefsError> {
    let mut l = TpLayout::EMPTY;
    tuple_layout(f, &mut l)?;
    l.error = f.require("error")?;
    l.protocol = f.require("protocol")?;
    l.skaddr = f.offset("skaddr")?;
    Ok(l)
}

/// `tcp:tcp_receive_reset` / `tcp:tcp_send_reset`: tuple; `skaddr`, `state`, `reason` when present.
pub fn reset_layout(f: &Format) -> Result<TpLayout, TracefsError> {
    let mut l = TpLayout::EMPTY;
    tuple_layout(f, &mut l)?;
    l.skaddr = f.offset("skaddr")?;
    l.state = f.offset("state")?;
    l.reason = f.offset("reason")?;
    Ok(l)
}

/// `bridge:br_fdb_update`: `br_dev`, `dev`, `addr`, `vid`.
pub fn fdb_layout(f: &Format) -> Result<FdbLayout, TracefsError> {
    Ok(FdbLayout {
        br_dev: f.require("br_dev")?,
        dev: f.require("dev")?,
        addr: f.require("addr")?,
        vid: f.require("vid")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRANSMIT: &str = "name: tcp_retransmit_skb
ID: 2281
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;

print fmt: \"skbaddr=%p\"
";

    const SEND_RESET: &str = "format:
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:enum sk_rst_reason reason;\toffset:28;\tsize:4;\tsigned:0;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;
";

    const FDB: &str = "format:
\tfield:__data_loc char[] br_dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] dev;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned char addr[6];\toffset:16;\tsize:6;\tsigned:0;
\tfield:u16 vid;\toffset:22;\tsize:2;\tsigned:0;
\tfield:unsigned long flags;\toffset:24;\tsize:8;\tsigned:0;
";

    #[test]
    fn parses_fields() {
        let f = Format::parse("tcp:tcp_retransmit_skb", RETRANSMIT);
        let saddr = f.field("saddr").unwrap();
        assert_eq!((saddr.offset, saddr.size, saddr.ctype.as_str()), (34, 4, "__u8"));
        assert_eq!(f.field("skaddr").unwrap().ctype, "const void *");
        let l = retransmit_layout(&f).unwrap();
        assert_eq!(
            (l.skaddr, l.state, l.sport, l.dport, l.family),
            (16, 24, 28, 30, 32)
        );
        assert_eq!((l.saddr, l.daddr, l.saddr_v6, l.daddr_v6), (34, 38, 42, 58));
        assert_eq!(l.flags, 0);
    }

    #[test]
    fn sockaddr_layout_for_send_reset() {
        let f = Format::parse("tcp:tcp_send_reset", SEND_RESET);
        let l = reset_layout(&f).unwrap();
        assert_eq!(l.flags, TP_SOCKADDR);
        assert_eq!(
            (l.saddr, l.daddr, l.state, l.reason, l.skaddr),
            (32, 60, 24, 28, 16)
        );
        assert_eq!(l.family, NO_FIELD);
    }

    #[test]
    fn fdb_data_loc_fields() {
        let l = fdb_layout(&Format::parse("bridge:br_fdb_update", FDB)).unwrap();
        assert_eq!((l.br_dev, l.dev, l.addr, l.vid), (8, 12, 16, 22));
    }

    #[test]
    fn missing_field_is_named() {
        let text = RETRANSMIT.replace("field:int state;", "field:int st;");
        let err = retransmit_layout(&Format::parse("tcp:tcp_retransmit_skb", &text)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("tcp:tcp_retransmit_skb") && msg.contains("`state`"),
            "{msg}"
        );
    }
}
