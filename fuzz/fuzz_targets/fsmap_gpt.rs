#![no_main]
//! Fitting an untrusted GPT image to a larger target, in memory.
use diskcast_fsmap::fit_gpt_to_disk;
use libfuzzer_sys::fuzz_target;
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    // The first two bytes: extra target size in sectors, sector size and grow flag.
    let Some((&[extra, flags], image)) = data.split_first_chunk::<2>() else {
        return;
    };
    let sector_size = if flags & 1 == 1 { 4096 } else { 512 };
    let image_size = image.len() as u64;
    let target_size = image_size + u64::from(extra) * sector_size;
    let mut disk = Cursor::new(image.to_vec());
    if fit_gpt_to_disk(
        &mut disk,
        image_size,
        target_size,
        sector_size,
        flags & 2 == 2,
    )
    .is_ok()
    {
        assert!(disk.get_ref().len() as u64 <= target_size.max(image_size));
    }
});
