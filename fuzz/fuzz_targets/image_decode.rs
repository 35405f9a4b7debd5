//! The image-folder decode path (format sniffing, JPEG/PNG/WebP decode, resize) on arbitrary
//! bytes: an error or a `size x size` RGB image, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&knobs, bytes)) = input.split_first() else {
        return;
    };
    let size = 1 + (knobs as usize % 64);
    if let Ok(rgb) = byol::data::folder::decode_bytes(bytes, size) {
        assert_eq!(rgb.len(), size * size * 3);
    }
});
