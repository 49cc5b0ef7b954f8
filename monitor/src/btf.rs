//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`) for struct member offsets.
//!
//! aya-ebpf has no CO-RE relocations, so the programs cannot ask the compiler where `icsk_rto` lives in this
//! kernel's `struct inet_connection_sock`. User space looks it up here and hands the byte offset to the programs
//! in a global. Only what that needs is parsed: the type section, struct/union members, and the modifiers
//! (typedef, const, volatile, ...) to follow to a member's struct type.

use std::{collections::HashMap, path::Path};

/// Errors reading BTF.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}: the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("BTF data is malformed: {0}")]
    Malformed(&'static str),
}

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    /// Offset in bits.
    bit_offset: u32,
    /// Non-zero for a bitfield.
    bitfield_size: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: String,
    /// For modifiers, typedefs and pointers: the referenced type.
    target: u32,
    members: Vec<Member>,
}

/// Parsed BTF: enough to find struct member offsets.
pub struct Btf {
    /// Index = type id (0 is `void`).
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u16_at(d: &[u8], off: usize) -> Result<u16, BtfError> {
    d.get(off..off + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(d: &[u8], off: usize) -> Result<u32, BtfError> {
    d.get(off..off + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

fn name_at(strings: &[u8], off: u32) -> String {
    let Some(rest) = strings.get(off as usize..) else {
        return String::new();
    };
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end]).into_owned()
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses little-endian BTF.
    pub fn parse(d: &[u8]) -> Result<Self, BtfError> {
        if u16_at(d, 0)? != BTF_MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = u32_at(d, 16)? as usize;
        let str_len = u32_at(d, 20)? as usize;
        let types_data = d
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = d
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?;

        let mut types = vec![Type {
            kind: 0,
            name: String::new(),
            target: 0,
            members: Vec::new(),
        }];
        let mut structs = HashMap::new();
        let mut p = 0usize;
        while p < types_data.len() {
            let name_off = u32_at(types_data, p)?;
            let info = u32_at(types_data, p + 4)?;
            let size_or_type = u32_at(types_data, p + 8)?;
            p += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            let mut ty = Type {
                kind,
                name: name_at(strings, name_off),
                target: 0,
                members: Vec::new(),
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => p += 4,
                KIND_PTR | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    ty.target = size_or_type;
                }
                KIND_ARRAY => p += 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = p + i * 12;
                        let raw_off = u32_at(types_data, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (raw_off & 0x00ff_ffff, raw_off >> 24)
                        } else {
                            (raw_off, 0)
                        };
                        ty.members.push(Member {
                            name: name_at(strings, u32_at(types_data, m)?),
                            type_id: u32_at(types_data, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    p += vlen * 12;
                }
                KIND_ENUM | KIND_FUNC_PROTO => p += vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => p += vlen * 12,
                KIND_FWD | KIND_FUNC | KIND_FLOAT => {}
                _ => return Err(BtfError::Malformed("unknown type kind")),
            }
            if kind == KIND_STRUCT && !ty.name.is_empty() && !ty.members.is_empty() {
                structs.entry(ty.name.clone()).or_insert(types.len() as u32);
            }
            types.push(ty);
        }
        Ok(Self { types, structs })
    }

    /// Follows typedefs and modifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.target;
                }
                _ => break,
            }
        }
        id
    }

    /// Finds `name` in the struct/union `id`, looking through anonymous struct/union members. Returns the bit
    /// offset and the member.
    fn find_member(&self, id: u32, name: &str) -> Option<(u32, &Member)> {
        let ty = self.types.get(self.resolve(id) as usize)?;
        if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
            return None;
        }
        for m in &ty.members {
            if m.name == name {
                return Some((m.bit_offset, m));
            }
        }
        for m in ty.members.iter().filter(|m| m.name.is_empty()) {
            if let Some((off, found)) = self.find_member(m.type_id, name) {
                return Some((m.bit_offset + off, found));
            }
        }
        None
    }

    /// Byte offset of `path` (member names, each in the struct type of the previous one) inside `struct
    /// struct_name`. `None` if a name is missing, a member is a bitfield, or not byte-aligned.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Option<u32> {
        let mut id = *self.structs.get(struct_name)?;
        let mut bits = 0u32;
        for name in path {
            let (off, m) = self.find_member(id, name)?;
            if m.bitfield_size != 0 {
                return None;
            }
            bits += off;
            id = m.type_id;
        }
        bits.is_multiple_of(8).then_some(bits / 8)
    }

    /// Bit offset and width of the bitfield at the end of `path` inside `struct struct_name` (like
    /// [`Btf::member_offset`], but the last member may be a bitfield; a plain member gives its type's width as
    /// unknown, 0).
    pub fn bitfield(&self, struct_name: &str, path: &[&str]) -> Option<(u32, u32)> {
        let mut id = *self.structs.get(struct_name)?;
        let mut bits = 0u32;
        let mut width = 0;
        for (i, name) in path.iter().enumerate() {
            let (off, m) = self.find_member(id, name)?;
            if m.bitfield_size != 0 && i + 1 != path.len() {
                return None;
            }
            bits += off;
            width = m.bitfield_size;
            id = m.type_id;
        }
        Some((bits, width))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF with `struct outer { int a; struct { char pad[3]; u8 b; }; struct inner in; }` where
    /// `struct inner { u32 x; u32 y; }`.
    fn fixture() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0in\0inner\0x\0y\0b\0".to_vec();
        let s = |name: &str| -> u32 {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0)
                .unwrap();
            pos as u32 + 1
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: struct inner { x @0, y @32 }
        push(s("inner"));
        push(KIND_STRUCT << 24 | 2);
        push(8);
        push(s("x"));
        push(1);
        push(0);
        push(s("y"));
        push(1);
        push(32);
        // 3: anonymous struct { b @24 }
        push(0);
        push(KIND_STRUCT << 24 | 1);
        push(4);
        push(s("b"));
        push(1);
        push(24);
        // 4: typedef inner_t = 2
        push(s("x"));
        push(KIND_TYPEDEF << 24);
        push(2);
        // 5: struct outer { a @0, <anon> @32, in @64 (typedef) }
        push(s("outer"));
        push(KIND_STRUCT << 24 | 3);
        push(16);
        push(s("a"));
        push(1);
        push(0);
        push(0);
        push(3);
        push(32);
        push(s("in"));
        push(4);
        push(64);
        let mut d = Vec::new();
        d.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        d.push(1);
        d.push(0);
        d.extend_from_slice(&24u32.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        d.extend_from_slice(&(t.len() as u32).to_le_bytes());
        d.extend_from_slice(&(t.len() as u32).to_le_bytes());
        d.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        d.extend_from_slice(&t);
        d.extend_from_slice(&strings);
        d
    }

    #[test]
    fn member_offsets_through_anonymous_and_typedef() {
        let btf = Btf::parse(&fixture()).unwrap();
        assert_eq!(btf.member_offset("outer", &["a"]), Some(0));
        assert_eq!(btf.member_offset("outer", &["b"]), Some(7));
        assert_eq!(btf.member_offset("outer", &["in", "y"]), Some(12));
        assert_eq!(btf.member_offset("outer", &["missing"]), None);
        assert_eq!(btf.member_offset("nosuch", &["a"]), None);
    }

    #[test]
    fn rejects_bad_magic() {
        assert!(Btf::parse(&[0u8; 24]).is_err());
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;

    /// The offsets the probes need, from this machine's kernel (skipped where the kernel has no BTF).
    #[test]
    fn running_kernel_has_the_socket_members() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: /sys/kernel/btf/vmlinux is not readable");
            return;
        };
        for (s, path) in [
            ("sock", &["__sk_common", "skc_state"][..]),
            ("sock", &["__sk_common", "skc_net", "net"][..]),
            ("net", &["ns", "inum"][..]),
            ("inet_connection_sock", &["icsk_retransmits"][..]),
            ("inet_connection_sock", &["icsk_backoff"][..]),
            ("inet_connection_sock", &["icsk_rto"][..]),
            ("tcp_sock", &["srtt_us"][..]),
        ] {
            let off = btf.member_offset(s, path);
            assert!(off.is_some(), "{s}.{path:?} not found");
        }
        // struct sock starts with its sock_common.
        assert_eq!(btf.member_offset("sock", &["__sk_common"]), Some(0));
    }
}
