//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Rust eBPF gets no CO-RE relocations, so the few kernel struct fields the programs read
//! (`struct sock_common`'s addresses and ports, for connections that predate the agent) are
//! located here, at load time, and handed to the programs as globals.
use std::collections::HashMap;

pub use agent_common::config::SockOffsets;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("cannot read /sys/kernel/btf/vmlinux: {0}")]
    Read(String),
    #[error("BTF data is truncated or malformed at byte {0}")]
    Malformed(usize),
    #[error("not BTF (bad magic)")]
    BadMagic,
    #[error("BTF kind {0} is unknown")]
    UnknownKind(u32),
    #[error("struct {0} not found in BTF")]
    NoStruct(String),
    #[error("member {1} not found in struct {0}")]
    NoMember(String, String),
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone, Default)]
struct Type {
    kind: u32,
    name_off: u32,
    members: Vec<Member>,
}

/// Parsed BTF: only what offset look-ups need (struct/union members and names).
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id (id 0 is `void`).
    types: Vec<Type>,
    by_name: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(BtfError::Malformed(at))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::parse(&std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| BtfError::Read(e.to_string()))?)
    }

    /// Parses little-endian BTF.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.get(0..2) != Some(&[0x9f, 0xeb]) {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_start = hdr_len + type_off;
        let strings = b
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed(hdr_len + str_off))?
            .to_vec();
        let end = types_start + type_len;
        if end > b.len() {
            return Err(BtfError::Malformed(end));
        }
        let mut types = vec![Type::default()];
        let mut at = types_start;
        while at < end {
            let name_off = u32_at(b, at)?;
            let info = u32_at(b, at + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let mut t = Type {
                kind,
                name_off,
                members: Vec::new(),
            };
            at += match kind {
                1 | 14 | 17 => 4,                            // int, var, decl_tag
                2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // ptr, fwd, typedef, volatile, const, restrict, func, float, type_tag
                3 => 12,                                     // array
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let raw = u32_at(b, m + 8)?;
                        t.members.push(Member {
                            name_off: u32_at(b, m)?,
                            type_id: u32_at(b, m + 4)?,
                            bit_offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // enum, func_proto
                15 | 19 => vlen * 12, // datasec, enum64
                other => return Err(BtfError::UnknownKind(other)),
            };
            types.push(t);
        }
        let mut btf = Btf {
            strings,
            types,
            by_name: HashMap::new(),
        };
        for (id, t) in btf.types.iter().enumerate() {
            if t.kind == KIND_STRUCT && t.name_off != 0 {
                let name = btf.name(t.name_off).to_owned();
                btf.by_name.entry(name).or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous unions/structs.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        self.find(id, member, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))
    }

    fn find(&self, id: u32, member: &str, depth: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            if m.name_off != 0 {
                if self.name(m.name_off) == member {
                    return Some(m.bit_offset);
                }
            } else if let Some(inner) = self
                .anonymous(m.type_id)
                .and_then(|inner| self.find(inner, member, depth + 1))
            {
                return Some(m.bit_offset + inner);
            }
        }
        None
    }

    /// The type of an anonymous member, if it is a struct or union to look into.
    fn anonymous(&self, id: u32) -> Option<u32> {
        let t = self.types.get(id as usize)?;
        matches!(t.kind, KIND_STRUCT | KIND_UNION).then_some(id)
    }
}

/// Offsets in `struct sock_common` the kernel programs read.
pub fn sock_offsets(btf: &Btf) -> Result<SockOffsets, BtfError> {
    let f = |m| btf.member_offset("sock_common", m);
    Ok(SockOffsets {
        valid: 1,
        daddr: f("skc_daddr")?,
        rcv_saddr: f("skc_rcv_saddr")?,
        dport: f("skc_dport")?,
        num: f("skc_num")?,
        family: f("skc_family")?,
        v6_daddr: f("skc_v6_daddr")?,
        v6_rcv_saddr: f("skc_v6_rcv_saddr")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF (every machine this agent runs on has it).
    #[test]
    fn sock_common_offsets_from_this_kernel() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("no readable /sys/kernel/btf/vmlinux here; skipped");
            return;
        };
        let o = sock_offsets(&btf).unwrap();
        // Stable for a decade: the address pair, then the port pair, then the family.
        assert_eq!((o.daddr, o.rcv_saddr, o.dport, o.num, o.family), (0, 4, 12, 14, 16));
        assert!(o.v6_daddr > o.family && o.v6_rcv_saddr == o.v6_daddr + 16);
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(Btf::parse(b"nope").err(), Some(BtfError::BadMagic));
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
    }
}
