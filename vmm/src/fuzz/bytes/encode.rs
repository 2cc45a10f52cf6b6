//! The inverse of `arbitrary`'s decoding of the input format (arbitrary
//! 1.5, as `Cargo.lock` pins it): bytes that decode to a given [`Input`].
//! Integers are little-endian bytes; a `bool` is the low bit of a byte; a
//! derived enum reads a `u32` and takes variant `(u32 * count) >> 32`; a
//! `Vec` reads a byte before each element, whose low bit says whether one
//! follows (the last field's `Vec`, taking the rest, likewise, and ends
//! where the data does). Converting the corpus to a new format is decoding
//! each input in the old one and encoding it in the new one.

use super::{Addr, Dma, Input, Op, Place, Size};

/// Appends the bytes `arbitrary` decodes to `self`.
pub(super) trait Encode {
    fn encode(&self, out: &mut Vec<u8>);
}

impl Encode for u8 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(*self);
    }
}

impl Encode for u16 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Encode for u64 {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
}

impl Encode for bool {
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

impl<T: Encode> Encode for &T {
    fn encode(&self, out: &mut Vec<u8>) {
        (*self).encode(out);
    }
}

/// Elements, each after a byte saying one follows.
fn elements<T: Encode>(items: &[T], out: &mut Vec<u8>) {
    for item in items {
        true.encode(out);
        item.encode(out);
    }
}

/// A `Vec` that is not the last field: its elements, then a byte saying
/// none follows.
impl<T: Encode> Encode for Vec<T> {
    fn encode(&self, out: &mut Vec<u8>) {
        elements(self, out);
        false.encode(out);
    }
}

/// Variant `index` of a derived enum of `count` variants: the smallest
/// `u32` whose `(u32 * count) >> 32` is `index`.
fn variant(index: u32, count: u32, out: &mut Vec<u8>) {
    let tag = (u64::from(index) << 32).div_ceil(u64::from(count));
    let tag = u32::try_from(tag).expect("a variant index below the count");
    out.extend_from_slice(&tag.to_le_bytes());
}

impl Encode for Addr {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Addr::Page(n) => {
                variant(0, 4, out);
                n.encode(out);
            }
            Addr::Huge(n) => {
                variant(1, 4, out);
                n.encode(out);
            }
            Addr::Special(n) => {
                variant(2, 4, out);
                n.encode(out);
            }
            Addr::Raw(v) => {
                variant(3, 4, out);
                v.encode(out);
            }
        }
    }
}

impl Encode for Size {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Size::Pages(n) => {
                variant(0, 3, out);
                n.encode(out);
            }
            Size::Huge(n) => {
                variant(1, 3, out);
                n.encode(out);
            }
            Size::Raw(v) => {
                variant(2, 3, out);
                v.encode(out);
            }
        }
    }
}

impl Encode for Place {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Place::Page(n) => {
                variant(0, 3, out);
                n.encode(out);
            }
            Place::Huge(n) => {
                variant(1, 3, out);
                n.encode(out);
            }
            Place::HugeEnd(n) => {
                variant(2, 3, out);
                n.encode(out);
            }
        }
    }
}

impl Encode for Dma {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Dma::Fill { at, pages, value } => {
                variant(0, 3, out);
                (at, pages, value).encode(out);
            }
            Dma::Copy { at, pages, to } => {
                variant(1, 3, out);
                (at, pages, to).encode(out);
            }
            Dma::Checksum { at, pages } => {
                variant(2, 3, out);
                (at, pages).encode(out);
            }
        }
    }
}

/// Variants of [`Op`].
const OPS: u32 = 15;

impl Encode for Op {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut tag = |i| variant(i, OPS, out);
        match self {
            Op::Plug {
                at,
                size,
                backing,
                flags,
            } => {
                tag(0);
                (at, size, backing, flags).encode(out);
            }
            Op::Unplug { at, size } => {
                tag(1);
                (at, size).encode(out);
            }
            Op::Protect { at, size, ro } => {
                tag(2);
                (at, size, ro).encode(out);
            }
            Op::Move { at, size, to } => {
                tag(3);
                (at, size, to).encode(out);
            }
            Op::Resize { at, size } => {
                tag(4);
                (at, size).encode(out);
            }
            Op::DirtyLog { at, size, on } => {
                tag(5);
                (at, size, on).encode(out);
            }
            Op::DirtyPages { at, size } => {
                tag(6);
                (at, size).encode(out);
            }
            Op::Pin {
                name,
                at,
                size,
                revocable,
                write,
            } => {
                tag(7);
                (name, at, size, revocable, write).encode(out);
            }
            Op::Unpin { name } => {
                tag(8);
                name.encode(out);
            }
            Op::Check => tag(9),
            Op::PlugMany { at, below, count } => {
                tag(10);
                (at, below, count).encode(out);
            }
            Op::Fill { at, pages, seed } => {
                tag(11);
                (at, pages, seed).encode(out);
            }
            Op::Write { at, word } => {
                tag(12);
                (at, word).encode(out);
            }
            Op::Touch { at, pages, stride } => {
                tag(13);
                (at, pages, stride).encode(out);
            }
            Op::Dma(d) => {
                tag(14);
                d.encode(out);
            }
        }
    }
}

/// A tuple: its fields in order (as `arbitrary` decodes a tuple, and the
/// fields of a struct or enum variant).
macro_rules! fields {
    ($($t:ident),*) => {
        #[allow(non_snake_case)]
        impl<$($t: Encode),*> Encode for ($($t,)*) {
            fn encode(&self, out: &mut Vec<u8>) {
                let ($($t,)*) = self;
                $($t.encode(out);)*
            }
        }
    };
}
fields!(A, B);
fields!(A, B, C);
fields!(A, B, C, D);
fields!(A, B, C, D, E);

impl Encode for Input {
    fn encode(&self, out: &mut Vec<u8>) {
        self.ops.encode(out);
        // The last field takes the rest: no byte after its last element.
        elements(&self.faults, out);
    }
}

/// The bytes that decode to `input`.
pub(super) fn encode(input: &Input) -> Vec<u8> {
    let mut out = Vec::new();
    input.encode(&mut out);
    out
}
