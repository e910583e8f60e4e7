//! Dialogs in the server: the protocol's dialog state ([`moonroute_proto::dialog`], RFC 3261
//! §12) and the CDR file the ended calls' records are appended to ([`cdr_file`]).

pub mod cdr_file;

pub use cdr_file::{CdrFile, CdrSettings, CdrSink};
pub use moonroute_proto::dialog::*;
