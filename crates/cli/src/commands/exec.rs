//! `aloft machine exec ID [--] CMD...`: runs a command in a machine and prints its output;
//! exits with the command's exit code.

use anyhow::Context;

use super::ssh::{Session, run_session};
use crate::settings::ApiArgs;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The machine.
    pub machine: String,
    /// The command and its arguments (one argument is split like a shell would).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
    #[arg(short = 'a', long = "app")]
    pub app: Option<String>,
    #[arg(short = 'c', long = "config")]
    pub config: Option<std::path::PathBuf>,
}

/// The command's words: several arguments as given; a single one split like a shell.
pub fn command_words(command: &[String]) -> anyhow::Result<Vec<String>> {
    match command {
        [single] => {
            shell_words::split(single).with_context(|| format!("invalid command {single:?}"))
        }
        many => Ok(many.to_vec()),
    }
}

pub async fn run(api: &ApiArgs, app: &str, args: &ExecArgs) -> anyhow::Result<i32> {
    let command = command_words(&args.command)?;
    if command.first().is_none_or(|c| c.is_empty()) {
        anyhow::bail!("no command given: aloft machine exec ID -- CMD [ARGS...]");
    }
    run_session(
        api,
        Session {
            app,
            machine: &args.machine,
            command: Some(command),
            tty: false,
            stdin: false,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_argument_is_split_like_a_shell() {
        assert_eq!(
            command_words(&["ls -l '/a b'".into()]).unwrap(),
            ["ls", "-l", "/a b"]
        );
        assert_eq!(
            command_words(&["echo".into(), "a b".into()]).unwrap(),
            ["echo", "a b"]
        );
    }
}
