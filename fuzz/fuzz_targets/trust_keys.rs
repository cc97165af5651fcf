#![no_main]
//! Keys from command lines, settings and key files: public key lists, secret key files, and a
//! signature check over whatever bytes come.
use diskcast_proto::trust::{parse_key_list, SigningKey, Trust};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_seed([7; 32]);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(keys) = parse_key_list(text) {
            let rendered: Vec<String> = keys.iter().map(ToString::to_string).collect();
            assert_eq!(parse_key_list(&rendered.join(",")), Ok(keys));
        }
        if let Ok(parsed) = SigningKey::from_key_file(text) {
            assert_eq!(SigningKey::from_key_file(&parsed.key_file()), Ok(parsed));
        }
    }
    // A signature is only ever valid for the statement it was made for.
    let (statement, signature) = data.split_at(data.len().saturating_sub(64));
    let trust = Trust::Keys(vec![key.public()]);
    if trust.check(statement, signature).is_ok() {
        assert_eq!(key.sign(statement).as_slice(), signature);
    }
});
