//! Wire types of the Fly-compatible Machines API and of Aloft's internal APIs.

pub mod app;
pub mod duration;
pub mod internal;
pub mod machine;
pub mod platform;
pub mod regions;
pub mod secrets;
pub mod sixpn;
pub mod token;

pub use app::*;
pub use duration::{Duration, ParseDurationError};
pub use machine::*;
pub use platform::*;
