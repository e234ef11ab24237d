//! A standalone init for the integration tests (the product runs `aloft_init::run()`
//! from the `aloft` binary).

fn main() {
    aloft_init::run()
}
