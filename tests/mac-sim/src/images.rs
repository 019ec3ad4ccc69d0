//! STAND-IN for the sim-iboot branch's image checks (agreed API only); replaced at merge.

use crate::board::Board;
use std::path::Path;

pub fn validate_ibss(data: &[u8], _board: &Board) -> Result<(), String> {
    if data.windows(4).any(|w| w == b"IMG4") && data.windows(4).any(|w| w == b"ibss") {
        Ok(())
    } else {
        Err("not an IMG4 with 4CC ibss".into())
    }
}

pub fn write_bootchain(_board: &Board, _dir: &Path) -> Result<(), String> {
    Err("make-bootchain needs the sim-iboot branch (stand-in)".into())
}
