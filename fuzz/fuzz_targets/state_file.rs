//! The state file as it may be found after a crash, an edit or another version: it loads
//! into a ledger, or is refused with a reason; a loaded one saves and loads back the same.
#![no_main]

use apiban::state::State;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = State::parse(data) else {
        return;
    };
    let ledger = state.ledger();
    let mut again = state.clone();
    again.set_ledger(&ledger);
    let json = serde_json::to_vec(&again).expect("a state serialises");
    let back = State::parse(&json).expect("what was saved loads");
    assert_eq!(back.ledger().len(), ledger.len());
});
