#![no_main]
//! JSON bodies the bootserver's API takes from the network: task requests (admin) and agent
//! reports (any machine with a task token), and a receive task's trust option.
use diskcast_bootserver::lab::tasks::{parse_task_trust, TaskRequest};
use diskcast_proto::report::AgentReport;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = serde_json::from_slice::<TaskRequest>(data) {
        if let Some(trust) = &request.options.trust {
            let _ = parse_task_trust(trust);
        }
    }
    if let Ok(report) = serde_json::from_slice::<AgentReport>(data) {
        let again = serde_json::to_vec(&report).expect("a parsed report serialises");
        let _ = serde_json::from_slice::<AgentReport>(&again).expect("and parses back");
    }
});
