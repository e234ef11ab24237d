//! PID 1 inside every machine
