//! Failure routing from a script (ported below).
