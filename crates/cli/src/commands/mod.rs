pub mod apps;
pub mod deploy;
pub mod server;
pub mod status;
