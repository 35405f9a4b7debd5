//! The CIFAR binary reader on arbitrary bytes: an error or records, never a panic.
#![no_main]

use byol::data::cifar::Cifar;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // First byte: variant and output size; the rest is the file.
    let Some((&knobs, bytes)) = input.split_first() else {
        return;
    };
    let kind = if knobs & 1 == 0 {
        Cifar::Ten
    } else {
        Cifar::Hundred
    };
    let size = [32, 16, 8, 40][(knobs as usize >> 1) & 3];
    let classes = if kind == Cifar::Ten { 10 } else { 100 };
    if let Ok((pixels, labels)) = kind.parse(bytes, classes, size) {
        assert_eq!(pixels.len(), labels.len() * size * size * 3);
        assert!(labels.iter().all(|&l| l < classes));
    }
});
