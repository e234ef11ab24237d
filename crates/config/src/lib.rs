//! fly.toml model: parse TOML/JSON/YAML as flyctl does, validate, convert to machine configs
