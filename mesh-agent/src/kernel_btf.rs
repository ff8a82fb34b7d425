//! Offsets of kernel structure fields, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`), for the kernel programs that read those fields with
//! `bpf_probe_read_kernel` (the Rust kernel programs have no CO-RE relocations).
//!
//! Only what the short-cut's budget needs ([`KernelOffsets`]). Each field is checked for its
//! size as well as found, so a kernel whose layout differs is refused by name instead of read
//! wrongly; the agent then runs without the short-cut.

use std::{fs, path::Path};

use mesh_common::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// `struct btf_type`: `name_off`, `info`, `size`/`type`.
const TYPE_LEN: usize = 12;

// Kinds (`info` bits 24-28) that this module follows or skips.
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

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("BTF: {0}")]
    Malformed(String),
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF: struct {strukt} has no field {field}")]
    NoField { strukt: String, field: String },
    #[error("BTF: {strukt}.{field} is {found} bytes, expected {expected}")]
    FieldSize {
        strukt: String,
        field: String,
        found: u32,
        expected: u32,
    },
    #[error("BTF: {strukt}.{field} is a bit field")]
    BitField { strukt: String, field: String },
}

/// One type of the BTF type section.
#[derive(Clone, Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// `size` for sized kinds (int, struct, union, enum, float), the referenced type otherwise.
    size_or_ref: u32,
    /// Struct and union members: (`name_off`, type, bit offset, bit-field size or 0).
    members: Vec<(u32, u32, u32, u32)>,
    /// Array element type and count.
    array: Option<(u32, u32)>,
}

/// A parsed BTF blob: its types (id 1 is `types[0]`) and string section.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| BtfError::Malformed(format!("truncated at byte {at}")))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (the only byte order of the machines we run on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data
            .get(..2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| BtfError::Malformed("empty".into()))?;
        if magic != BTF_MAGIC {
            return Err(BtfError::Malformed(format!(
                "magic {magic:#x}, expected {BTF_MAGIC:#x} (little-endian BTF)"
            )));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        if hdr_len < HEADER_LEN {
            return Err(BtfError::Malformed(format!("header of {hdr_len} bytes")));
        }
        let section = |off_at: usize, len_at: usize| -> Result<&[u8], BtfError> {
            let start = hdr_len + u32_at(data, off_at)? as usize;
            let len = u32_at(data, len_at)? as usize;
            data.get(start..start + len)
                .ok_or_else(|| BtfError::Malformed(format!("section {start}+{len} out of range")))
        };
        let type_data = section(8, 12)?;
        let strings = section(16, 20)?.to_vec();
        let mut types = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let (ty, len) = parse_type(type_data, at)?;
            types.push(ty);
            at += len;
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn ty(&self, id: u32) -> Option<&Type> {
        self.types.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<(u32, &Type)> {
        for _ in 0..32 {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_ref;
                }
                _ => return Some((id, ty)),
            }
        }
        None
    }

    /// Size in bytes of the type `id`.
    fn size_of(&self, id: u32) -> Option<u32> {
        let (_, ty) = self.resolve(id)?;
        match ty.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT => {
                Some(ty.size_or_ref)
            }
            KIND_PTR => Some(8),
            KIND_ARRAY => {
                let (elem, n) = ty.array?;
                self.size_of(elem)?.checked_mul(n)
            }
            _ => None,
        }
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.types
            .iter()
            .zip(1u32..)
            .find(|(t, _)| t.kind == KIND_STRUCT && self.name(t.name_off) == name)
            .map(|(_, id)| id)
            .ok_or_else(|| BtfError::NoStruct(name.into()))
    }

    /// Byte offset and type of the member `name` of the struct or union `id`, looking into
    /// anonymous struct and union members as C does.
    fn member(&self, id: u32, name: &str) -> Option<(u32, u32, u32)> {
        let (_, ty) = self.resolve(id)?;
        for &(name_off, member_ty, bit_off, bits) in &ty.members {
            if name_off == 0 {
                let (_, inner) = self.resolve(member_ty)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, t, b)) = self.member(member_ty, name) {
                        return Some((bit_off / 8 + off, t, b));
                    }
                }
            } else if self.name(name_off) == name {
                return Some((bit_off / 8, member_ty, bits));
            }
        }
        None
    }

    /// Byte offset of `path` (`"sk_receive_queue.qlen"`) inside struct `strukt`, checked to be
    /// a whole field of `size` bytes.
    pub fn field_offset(&self, strukt: &str, path: &str, size: u32) -> Result<u32, BtfError> {
        let no_field = || BtfError::NoField {
            strukt: strukt.into(),
            field: path.into(),
        };
        let mut id = self.struct_id(strukt)?;
        let mut offset = 0u32;
        let mut bitfield = false;
        for part in path.split('.') {
            let (off, ty, bits) = self.member(id, part).ok_or_else(no_field)?;
            offset = offset.checked_add(off).ok_or_else(no_field)?;
            bitfield = bits != 0;
            id = ty;
        }
        if bitfield {
            return Err(BtfError::BitField {
                strukt: strukt.into(),
                field: path.into(),
            });
        }
        let found = self.size_of(id).ok_or_else(no_field)?;
        if found != size {
            return Err(BtfError::FieldSize {
                strukt: strukt.into(),
                field: path.into(),
                found,
                expected: size,
            });
        }
        Ok(offset)
    }

    /// The offsets the short-cut's budget reads (see `mesh_common::KernelOffsets`).
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        Ok(KernelOffsets {
            tcp_write_seq: self.field_offset("tcp_sock", "write_seq", 4)?,
            tcp_snd_una: self.field_offset("tcp_sock", "snd_una", 4)?,
            sk_user_data: self.field_offset("sock", "sk_user_data", 8)?,
            sk_receive_qlen: self.field_offset("sock", "sk_receive_queue.qlen", 4)?,
            psock_msg_tot_len: self.field_offset("sk_psock", "msg_tot_len", 4)?,
            sk_state: self.field_offset("sock", "__sk_common.skc_state", 1)?,
        })
    }
}

/// One type at `at` in the type section, and its length in bytes.
fn parse_type(data: &[u8], at: usize) -> Result<(Type, usize), BtfError> {
    let name_off = u32_at(data, at)?;
    let info = u32_at(data, at + 4)?;
    let size_or_ref = u32_at(data, at + 8)?;
    let kind = (info >> 24) & 0x1f;
    let kind_flag = info >> 31 == 1;
    let vlen = (info & 0xffff) as usize;
    let extra = at + TYPE_LEN;
    let mut ty = Type {
        name_off,
        kind,
        size_or_ref,
        members: Vec::new(),
        array: None,
    };
    let len = match kind {
        KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
        | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => {
            ty.array = Some((u32_at(data, extra)?, u32_at(data, extra + 8)?));
            12
        }
        KIND_STRUCT | KIND_UNION => {
            for i in 0..vlen {
                let m = extra + i * 12;
                let offset = u32_at(data, m + 8)?;
                let (bit_off, bits) = if kind_flag {
                    (offset & 0x00ff_ffff, offset >> 24)
                } else {
                    (offset, 0)
                };
                ty.members
                    .push((u32_at(data, m)?, u32_at(data, m + 4)?, bit_off, bits));
            }
            vlen * 12
        }
        KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
        KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        other => {
            return Err(BtfError::Malformed(format!(
                "unknown kind {other} at type byte {at}"
            )))
        }
    };
    Ok((ty, TYPE_LEN + len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a little-endian BTF blob from (`name`, `info`, `size_or_ref`, extra words).
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                types: Vec::new(),
                strings: vec![0],
            }
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = u32::try_from(self.strings.len()).unwrap();
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }
        fn add(&mut self, name: &str, kind: u32, vlen: u32, size: u32, extra: &[u32]) {
            let name = self.string(name);
            for w in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }
        fn member(&mut self, name: &str, ty: u32, bit_off: u32) -> [u32; 3] {
            [self.string(name), ty, bit_off]
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            let type_len = u32::try_from(self.types.len()).unwrap();
            let str_len = u32::try_from(self.strings.len()).unwrap();
            for w in [24, 0, type_len, type_len, str_len] {
                out.extend_from_slice(&u32::to_le_bytes(w));
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// 1: `u32`, 2: `void *`, 3: `struct inner { u32 qlen at 8 }` (16 bytes),
    /// 4: `union { u32 hidden }` (anonymous), 5: `typedef u32 seq_t`,
    /// 6: `struct outer { seq_t seq at 4; struct inner q at 8; (the union) at 24; void *p at 32;
    /// u32 bits:3 at 40 }`.
    fn sample() -> Btf {
        let mut b = Builder::new();
        b.add("u32", KIND_INT, 0, 4, &[32]);
        b.add("", KIND_PTR, 0, 0, &[]);
        let qlen = b.member("qlen", 1, 64);
        b.add("inner", KIND_STRUCT, 1, 16, &qlen);
        let hidden = b.member("hidden", 1, 0);
        b.add("", KIND_UNION, 1, 4, &hidden);
        b.add("seq_t", KIND_TYPEDEF, 0, 1, &[]);
        let members = [
            b.member("seq", 5, 32),
            b.member("q", 3, 64),
            b.member("", 4, 192),
            b.member("p", 2, 256),
        ];
        let mut words: Vec<u32> = members.iter().flatten().copied().collect();
        // A bit field, with the kind flag: offset 320, 3 bits.
        let bits = b.string("bits");
        words.extend([bits, 1, (3 << 24) | 0x140]);
        b.add("outer", KIND_STRUCT, 5, 48, &words);
        let blob = b.build();
        // Set the kind flag of the last type (the struct with the bit field).
        let mut blob = blob;
        let info_at = 24 + b.types.len() - (12 + 5 * 12) + 4;
        let info = u32::from_le_bytes(blob[info_at..info_at + 4].try_into().unwrap());
        blob[info_at..info_at + 4].copy_from_slice(&(info | 1 << 31).to_le_bytes());
        Btf::parse(&blob).unwrap()
    }

    #[test]
    fn fields_through_typedefs_nested_structs_and_anonymous_unions() {
        let btf = sample();
        assert_eq!(btf.field_offset("outer", "seq", 4).unwrap(), 4);
        assert_eq!(btf.field_offset("outer", "q.qlen", 4).unwrap(), 16);
        assert_eq!(btf.field_offset("outer", "hidden", 4).unwrap(), 24);
        assert_eq!(btf.field_offset("outer", "p", 8).unwrap(), 32);
        assert_eq!(btf.field_offset("inner", "qlen", 4).unwrap(), 8);
    }

    #[test]
    fn wrong_sizes_missing_fields_and_bit_fields_are_refused_by_name() {
        let btf = sample();
        let e = btf.field_offset("outer", "seq", 8).unwrap_err().to_string();
        assert_eq!(e, "BTF: outer.seq is 4 bytes, expected 8");
        let e = btf
            .field_offset("outer", "nope", 4)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "BTF: struct outer has no field nope");
        let e = btf.field_offset("absent", "x", 4).unwrap_err().to_string();
        assert_eq!(e, "BTF has no struct absent");
        let e = btf
            .field_offset("outer", "bits", 4)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "BTF: outer.bits is a bit field");
    }

    #[test]
    fn malformed_blobs_are_errors_not_panics() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0]).is_err());
        let mut blob = Builder::new().build();
        blob[0] = 0;
        assert!(Btf::parse(&blob).unwrap_err().to_string().contains("magic"));
        let mut b = Builder::new();
        b.add("x", 31, 0, 0, &[]);
        assert!(Btf::parse(&b.build())
            .unwrap_err()
            .to_string()
            .contains("unknown kind 31"));
    }

    #[test]
    fn the_running_kernel_has_the_fields_the_short_cut_reads() {
        // This machine kind runs 6.18 with BTF (see ARCHITECTURE.md, "kernel requirements").
        let btf = Btf::from_sys_fs().expect("the kernel publishes BTF at /sys/kernel/btf/vmlinux");
        let off = btf
            .kernel_offsets()
            .expect("tcp_sock, sock and sk_psock fields");
        // `struct sock` starts `struct tcp_sock`, so both sock fields lie before the TCP ones.
        assert!(off.sk_user_data > 0 && off.sk_receive_qlen > 0);
        assert!(off.tcp_write_seq > off.sk_user_data);
        assert_ne!(off.tcp_write_seq, off.tcp_snd_una);
    }
}
