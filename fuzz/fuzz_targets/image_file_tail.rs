#![no_main]
//! The parts of an image file read before any chunk: footer and metadata.
use diskcast_proto::image_file::{Footer, Metadata, FOOTER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..FOOTER_LEN).and_then(|b| <&[u8; FOOTER_LEN]>::try_from(b).ok()) {
        if let Ok(footer) = Footer::parse(bytes) {
            assert_eq!(Footer::parse(&footer.emit()), Ok(footer));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(meta) = Metadata::parse(text) {
            let again = Metadata::parse(&meta.render()).expect("rendered metadata parses");
            assert_eq!(again.created, meta.created);
        }
    }
});
