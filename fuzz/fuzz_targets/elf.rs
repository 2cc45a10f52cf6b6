//! Just enough of ELF64 to find this executable's sections and list its
//! symbol table.

/// A symbol of `.symtab`.
pub struct Symbol<'a> {
    /// Its (mangled) name.
    pub name: &'a [u8],
    /// Its address as linked.
    pub value: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Whether it is a function (`STT_FUNC`).
    pub func: bool,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| format!("ELF: short read at {at}"))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("ELF: short read at {at}"))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| format!("ELF: short read at {at}"))
}

/// The parts of a little-endian ELF64 image this needs.
pub struct Image<'a> {
    /// The entry point's address, as linked.
    pub entry: u64,
    /// Sections: name, address as linked, size.
    sections: Vec<(&'a [u8], u64, usize)>,
    /// Every symbol of `.symtab`.
    pub symbols: Vec<Symbol<'a>>,
}

fn name_at(b: &[u8], at: usize) -> Result<&[u8], String> {
    let name = b.get(at..).ok_or("ELF: name out of range")?;
    Ok(&name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())])
}

impl<'a> Image<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, String> {
        if b.get(..5) != Some(b"\x7fELF\x02") {
            return Err("not an ELF64 executable".into());
        }
        let entry = u64_at(b, 0x18)?;
        let shoff = u64_at(b, 0x28)? as usize;
        let shentsize = u16_at(b, 0x3a)? as usize;
        let shnum = u16_at(b, 0x3c)? as usize;
        let shstrndx = u16_at(b, 0x3e)? as usize;
        let header = |i: usize| shoff + i * shentsize;
        let names = u64_at(b, header(shstrndx) + 0x18)? as usize;
        let mut sections = Vec::with_capacity(shnum);
        let mut symtab = None;
        for i in 0..shnum {
            let h = header(i);
            let name = name_at(b, names + u32_at(b, h)? as usize)?;
            sections.push((name, u64_at(b, h + 0x10)?, u64_at(b, h + 0x20)? as usize));
            if u32_at(b, h + 4)? == 2 {
                symtab = Some(h);
            }
        }
        let symtab = symtab.ok_or("no .symtab (a stripped executable)")?;
        let off = u64_at(b, symtab + 0x18)? as usize;
        let size = u64_at(b, symtab + 0x20)? as usize;
        let strtab = header(u32_at(b, symtab + 0x28)? as usize);
        let strings = u64_at(b, strtab + 0x18)? as usize;
        let mut symbols = Vec::with_capacity(size / 24);
        for sym in (off..off + size).step_by(24) {
            symbols.push(Symbol {
                name: name_at(b, strings + u32_at(b, sym)? as usize)?,
                value: u64_at(b, sym + 8)?,
                size: u64_at(b, sym + 16)?,
                func: b.get(sym + 4).is_some_and(|info| info & 0xf == 2),
            });
        }
        Ok(Image {
            entry,
            sections,
            symbols,
        })
    }

    /// A section's address as linked and size.
    pub fn section(&self, name: &[u8]) -> Result<(u64, usize), String> {
        self.sections
            .iter()
            .find(|s| s.0 == name)
            .map(|s| (s.1, s.2))
            .ok_or_else(|| format!("no section {}", String::from_utf8_lossy(name)))
    }
}
