//! What migmon reads from a libvirt domain's XML (`virsh dumpxml`): its name, UUID, memory and network interfaces
//! (MAC, the host-side tap `<target dev>`, the bridge `<source bridge>`, addresses given in the XML).

use std::net::IpAddr;

use migmon_base::mac::MacAddr;
use quick_xml::events::{BytesStart, Event};

/// Errors reading a domain's XML.
#[derive(Debug, thiserror::Error)]
pub enum DomainXmlError {
    #[error("the domain XML is not well-formed at byte {offset}")]
    Syntax {
        offset: u64,
        #[source]
        source: quick_xml::Error,
    },
    #[error("the domain XML has no <domain> element")]
    NotADomain,
}

/// One network interface of a domain, as its live XML describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainIface {
    /// `<interface type=...>`: `bridge`, `network`, `ethernet`, `direct`, `user`, ...
    pub kind: String,
    /// The guest's MAC (`<mac address>`).
    pub mac: Option<MacAddr>,
    /// The host-side device (`<target dev>`): a tap for `bridge`, `network` and `ethernet`, a macvtap for `direct`.
    pub tap: Option<String>,
    /// `<source bridge>` (or, for `network` interfaces, the bridge libvirt reports in the live XML).
    pub bridge: Option<String>,
    /// `<source network>` of a `network` interface.
    pub network: Option<String>,
    /// Addresses the XML gives (`<ip address>`; libvirt only keeps them for some interface types).
    pub ips: Vec<IpAddr>,
}

/// The parts of a domain's XML the libvirt source uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainXml {
    pub name: String,
    pub uuid: String,
    /// `<currentMemory>` (or `<memory>`), in bytes.
    pub memory_bytes: u64,
    pub interfaces: Vec<DomainIface>,
}

impl DomainXml {
    /// The MAC that names the VM in migration events: its first interface's.
    pub fn mac(&self) -> Option<MacAddr> {
        self.interfaces.iter().find_map(|i| i.mac)
    }

    /// Every address the XML gives, once.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for ip in self.interfaces.iter().flat_map(|i| &i.ips) {
            if !out.contains(ip) {
                out.push(*ip);
            }
        }
        out
    }
}

/// Which element's text is being read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Text {
    None,
    Name,
    Uuid,
    Memory { current: bool, unit: u64 },
}

/// Bytes per unit of a libvirt memory `unit` attribute (default KiB).
fn unit_bytes(unit: &str) -> u64 {
    match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => 1 << 10,
    }
}

fn attr(e: &BytesStart<'_>, name: &str) -> Option<String> {
    e.try_get_attribute(name).ok().flatten().and_then(|a| {
        a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .ok()
            .map(std::borrow::Cow::into_owned)
    })
}

/// Parses a domain's XML. Elements it does not know are skipped; only malformed XML is an error.
pub fn parse(xml: &str) -> Result<DomainXml, DomainXmlError> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = DomainXml::default();
    let mut seen_domain = false;
    // The element path below <domain>, by local name.
    let mut path: Vec<String> = Vec::new();
    let mut text = Text::None;
    let mut buf = String::new();
    let mut memory = (0u64, 0u64);
    let mut iface: Option<DomainIface> = None;
    loop {
        let ev = reader.read_event().map_err(|source| DomainXmlError::Syntax {
            offset: reader.buffer_position(),
            source,
        })?;
        match ev {
            Event::Start(e) if path.is_empty() => {
                if e.local_name().as_ref() != b"domain" {
                    return Err(DomainXmlError::NotADomain);
                }
                seen_domain = true;
                path.push("domain".to_owned());
            }
            Event::Empty(e) if path.is_empty() => {
                if e.local_name().as_ref() != b"domain" {
                    return Err(DomainXmlError::NotADomain);
                }
                seen_domain = true;
                break;
            }
            Event::Start(e) => {
                let local = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                start(&path, &local, &e, &mut text, &mut iface);
                path.push(local);
                buf.clear();
            }
            Event::Empty(e) => {
                let local = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
                start(&path, &local, &e, &mut Text::None, &mut iface);
                if local == "interface" && path.len() == 2 {
                    out.interfaces.extend(iface.take());
                }
            }
            Event::Text(t) => {
                if text != Text::None {
                    buf.push_str(&t.decode().unwrap_or_default());
                }
            }
            Event::GeneralRef(r) => {
                if text != Text::None {
                    let name = r.decode().unwrap_or_default();
                    buf.push_str(match name.as_ref() {
                        "amp" => "&",
                        "lt" => "<",
                        "gt" => ">",
                        "quot" => "\"",
                        "apos" => "'",
                        _ => "",
                    });
                }
            }
            Event::End(_) => {
                let local = path.pop().unwrap_or_default();
                match text {
                    Text::Name => buf.trim().clone_into(&mut out.name),
                    Text::Uuid => out.uuid = buf.trim().to_ascii_lowercase(),
                    Text::Memory { current, unit } => {
                        let v = buf.trim().parse::<u64>().unwrap_or(0).saturating_mul(unit);
                        if current {
                            memory.1 = v;
                        } else {
                            memory.0 = v;
                        }
                    }
                    Text::None => {}
                }
                text = Text::None;
                if local == "interface" && path.len() == 2 {
                    out.interfaces.extend(iface.take());
                }
                if path.is_empty() {
                    break;
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !seen_domain {
        return Err(DomainXmlError::NotADomain);
    }
    out.memory_bytes = if memory.1 > 0 { memory.1 } else { memory.0 };
    Ok(out)
}

/// An element opened at `path` (below `<domain>`): what it sets.
fn start(path: &[String], local: &str, e: &BytesStart<'_>, text: &mut Text, iface: &mut Option<DomainIface>) {
    let parent: Vec<&str> = path.iter().map(String::as_str).collect();
    match (parent.as_slice(), local) {
        (["domain"], "name") => *text = Text::Name,
        (["domain"], "uuid") => *text = Text::Uuid,
        (["domain"], "memory" | "currentMemory") => {
            *text = Text::Memory {
                current: local == "currentMemory",
                unit: unit_bytes(attr(e, "unit").as_deref().unwrap_or("KiB")),
            };
        }
        (["domain", "devices"], "interface") => {
            *iface = Some(DomainIface {
                kind: attr(e, "type").unwrap_or_default(),
                ..DomainIface::default()
            });
        }
        (["domain", "devices", "interface"], child) => {
            let Some(i) = iface.as_mut() else { return };
            match child {
                "mac" => i.mac = attr(e, "address").and_then(|m| m.parse().ok()),
                "target" => i.tap = attr(e, "dev"),
                "source" => {
                    if let Some(b) = attr(e, "bridge") {
                        i.bridge = Some(b);
                    }
                    if let Some(n) = attr(e, "network") {
                        i.network = Some(n);
                    }
                    // A `direct` (macvtap) interface names its lower device here.
                    if i.kind == "direct"
                        && let Some(d) = attr(e, "dev")
                    {
                        i.bridge = Some(d);
                    }
                }
                "ip" => {
                    if let Some(ip) = attr(e, "address").and_then(|a| a.parse().ok())
                        && !i.ips.contains(&ip)
                    {
                        i.ips.push(ip);
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The live XML of a domain the libvirt test runs (libvirt 9.0, abridged).
    const LIVE: &str = r"<domain type='qemu' id='1'>
  <name>mm-lv&amp;1</name>
  <uuid>6B1C3E0A-8D55-4C9E-9A8B-0E1F2A3B4C5D</uuid>
  <memory unit='KiB'>65536</memory>
  <currentMemory unit='KiB'>65536</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='microvm'>hvm</type>
    <kernel>/tmp/guest.elf</kernel>
    <cmdline>ip=10.79.0.2/24</cmdline>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' index='0' model='none'/>
    <interface type='bridge'>
      <mac address='52:54:00:79:00:02'/>
      <source bridge='br-lvx'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='virtio-mmio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:79:00:03'/>
      <source network='default' portid='x' bridge='virbr0'/>
      <target dev='vnet1'/>
      <ip address='192.168.122.7' prefix='24'/>
    </interface>
    <interface type='user'/>
    <serial type='file'><source path='/tmp/g1.serial'/><target port='0'/></serial>
  </devices>
</domain>";

    #[test]
    fn reads_name_uuid_memory_and_interfaces() {
        let d = parse(LIVE).unwrap();
        assert_eq!(d.name, "mm-lv&1");
        assert_eq!(d.uuid, "6b1c3e0a-8d55-4c9e-9a8b-0e1f2a3b4c5d");
        assert_eq!(d.memory_bytes, 64 << 20);
        assert_eq!(d.interfaces.len(), 3, "{:#?}", d.interfaces);
        let a = &d.interfaces[0];
        assert_eq!(a.kind, "bridge");
        assert_eq!(a.mac.unwrap().to_string(), "52:54:00:79:00:02");
        assert_eq!(
            (a.tap.as_deref(), a.bridge.as_deref()),
            (Some("vnet0"), Some("br-lvx"))
        );
        let b = &d.interfaces[1];
        assert_eq!(
            (b.tap.as_deref(), b.bridge.as_deref(), b.network.as_deref()),
            (Some("vnet1"), Some("virbr0"), Some("default"))
        );
        assert_eq!(d.ips(), vec!["192.168.122.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(d.interfaces[2].kind, "user");
        assert_eq!(d.mac().unwrap().to_string(), "52:54:00:79:00:02");
    }

    #[test]
    fn an_inactive_domain_has_no_taps_and_a_memory_unit() {
        let d = parse(
            "<domain type='kvm'><name>x</name><memory unit='MiB'>512</memory><devices>\
             <interface type='bridge'><mac address='52:54:00:00:00:09'/><source bridge='br0'/></interface>\
             </devices></domain>",
        )
        .unwrap();
        assert_eq!(d.memory_bytes, 512 << 20);
        assert_eq!(d.interfaces[0].tap, None);
        assert_eq!(d.interfaces[0].bridge.as_deref(), Some("br0"));
    }

    #[test]
    fn malformed_or_foreign_xml_is_an_error() {
        assert!(matches!(
            parse("<domain><name>x</nam></domain>"),
            Err(DomainXmlError::Syntax { .. })
        ));
        assert!(matches!(parse("<network/>"), Err(DomainXmlError::NotADomain)));
        assert!(matches!(parse(""), Err(DomainXmlError::NotADomain)));
        // Bad values are skipped, not fatal.
        let d = parse("<domain><memory>lots</memory><devices><interface type='bridge'><mac address='zz'/></interface></devices></domain>").unwrap();
        assert_eq!((d.memory_bytes, d.interfaces[0].mac), (0, None));
    }
}
