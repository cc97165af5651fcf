#![no_main]
//! What `bootserver images pull` reads from another server before any chunk: the image file's
//! tail (manifest, metadata, footer), checked by `check_tail`. Any bytes: an error or a sound
//! image description, never a panic.
use diskcast_bootserver::pull::check_tail;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((data_len, image)) = check_tail(data, "fuzz") {
        assert_eq!(image.manifest.stored_bytes(), data_len);
        assert_eq!(image.file_len, data_len + data.len() as u64);
    }
});
