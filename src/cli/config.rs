//! `ferry serve --config FILE`: `serve` options from a YAML (or JSON) file.
//!
//! The file's keys are the `serve` flags' own names, written `max_body_bytes`
//! or `max-body-bytes`, found in clap's argument list rather than a second
//! list kept by hand: every `serve` flag has a key as soon as it exists, and
//! each value is parsed and checked by the same clap parser as the flag. A
//! flag on the command line, or its environment variable, overrides the file;
//! the file overrides the defaults. An unknown key is refused by name.

use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};

use super::Cli;

/// Why the command line could not be read.
#[derive(Debug)]
pub enum ArgsError {
    /// clap's own error (it prints itself, with usage, and knows its exit code).
    Clap(clap::Error),
    /// The config file is unreadable or says something wrong.
    Config(String),
}

impl From<clap::Error> for ArgsError {
    fn from(e: clap::Error) -> Self {
        ArgsError::Clap(e)
    }
}

/// Parses the command line; for `serve --config FILE`, the file fills the
/// options not given as flags or environment variables.
pub fn parse_from(argv: Vec<OsString>) -> Result<Cli, ArgsError> {
    let matches = Cli::command().try_get_matches_from(&argv)?;
    let Some(("serve", serve)) = matches.subcommand() else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let Some(file) = serve.get_one::<std::path::PathBuf>("config") else {
        return Ok(Cli::from_arg_matches(&matches)?);
    };
    let extra = file_args(file, |id| {
        matches!(
            serve.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    })?;
    let mut argv = argv;
    argv.extend(extra);
    Cli::command()
        .try_get_matches_from(&argv)
        .and_then(|m| Cli::from_arg_matches(&m))
        .map_err(|e| {
            ArgsError::Config(format!(
                "in the config file {}: {}",
                file.display(),
                e.render().to_string().trim_start_matches("error: ").trim()
            ))
        })
}

/// The flags (`--name=value`) that the config file stands for, leaving out
/// the options `given` elsewhere.
fn file_args(file: &Path, given: impl Fn(&str) -> bool) -> Result<Vec<OsString>, ArgsError> {
    let at = |msg: String| ArgsError::Config(format!("the config file {}: {msg}", file.display()));
    let text = std::fs::read_to_string(file).map_err(|e| at(format!("cannot be read: {e}")))?;
    let doc: yaml_serde::Value =
        yaml_serde::from_str(&text).map_err(|e| at(format!("is not valid YAML: {e}")))?;
    let map = match doc {
        yaml_serde::Value::Mapping(m) => m,
        yaml_serde::Value::Null => return Ok(Vec::new()),
        _ => {
            return Err(at(
                "must be a mapping of `serve` options (`listen: 127.0.0.1:8080`)".into(),
            ));
        }
    };
    let command = Cli::command();
    let serve = command
        .find_subcommand("serve")
        .expect("the serve subcommand");
    let keys = || {
        serve
            .get_arguments()
            .filter(|a| a.get_id() != "config" && a.get_long().is_some())
    };
    let mut out = Vec::new();
    for (key, value) in map {
        let key = match key {
            yaml_serde::Value::String(k) => k,
            other => return Err(at(format!("keys must be option names, not {other:?}"))),
        };
        let id = key.replace('-', "_");
        let Some(arg) = keys().find(|a| a.get_id() == id.as_str()) else {
            let all: Vec<String> = keys().map(|a| a.get_id().to_string()).collect();
            let hint = if id == "config" {
                "a config file cannot name another one".to_string()
            } else {
                format!("the keys are the `ferry serve` options: {}", all.join(", "))
            };
            return Err(at(format!("unknown key `{key}`; {hint}")));
        };
        if given(arg.get_id().as_str()) {
            continue;
        }
        let long = arg.get_long().expect("filtered on long names");
        let values = match value {
            yaml_serde::Value::Sequence(items) => items,
            v => vec![v],
        };
        for v in values {
            let text = match v {
                yaml_serde::Value::String(s) => s,
                yaml_serde::Value::Number(n) => n.to_string(),
                yaml_serde::Value::Bool(b) => b.to_string(),
                other => {
                    return Err(at(format!(
                        "`{key}` must be a value or a list of values, not {other:?}"
                    )));
                }
            };
            if arg.get_action().takes_values() {
                out.push(format!("--{long}={text}").into());
            } else if text == "true" {
                out.push(format!("--{long}").into());
            } else if text != "false" {
                return Err(at(format!("`{key}` must be true or false, not {text}")));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn serve_with(file_text: &str, flags: &[&str]) -> Result<Box<crate::cli::ServeArgs>, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ferry.yaml");
        std::fs::write(&file, file_text).unwrap();
        let mut argv: Vec<OsString> = vec!["ferry".into(), "serve".into(), "--config".into()];
        argv.push(file.into());
        argv.extend(flags.iter().map(OsString::from));
        match parse_from(argv) {
            Ok(Cli {
                command: Command::Serve(args),
                ..
            }) => Ok(args),
            Ok(_) => panic!("not serve"),
            Err(ArgsError::Config(e)) => Err(e),
            Err(ArgsError::Clap(e)) => Err(e.to_string()),
        }
    }

    #[test]
    fn the_file_fills_options_and_flags_win() {
        let a = serve_with(
            "listen: 127.0.0.1:9999\nmax-body-bytes: 1234\ndrain_timeout: 5s\nallow_host: [a.example, b.example]\nmax_connections: 7\n",
            &["--max-connections", "9"],
        )
        .unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:9999");
        assert_eq!(a.max_body_bytes, 1234);
        assert_eq!(a.drain_timeout.to_string(), "5s");
        assert_eq!(a.allow_host, vec!["a.example", "b.example"]);
        assert_eq!(a.max_connections, 9);
        // Untouched options keep their defaults; an empty file is fine.
        let d = serve_with("", &[]).unwrap();
        assert_eq!(d.max_connections, 4096);
    }

    #[test]
    fn every_serve_flag_is_a_key() {
        let command = Cli::command();
        let serve = command.find_subcommand("serve").unwrap();
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "config" || !arg.get_action().takes_values() {
                continue;
            }
            // A key the parser does not know is refused by name; every flag's
            // key gets past that (its value may still be wrong for it).
            let err = serve_with(&format!("{id}: \"x\"\n"), &[]).err();
            assert!(
                !err.as_deref().unwrap_or("").contains("unknown key"),
                "{id}: {err:?}"
            );
        }
    }

    #[test]
    fn mistakes_are_named() {
        for (text, wanted) in [
            ("max_body_byte: 1\n", "unknown key `max_body_byte`"),
            ("config: other.yaml\n", "cannot name another"),
            ("drain_timeout: soon\n", "--drain-timeout"),
            ("listen: {a: 1}\n", "`listen` must be a value"),
            ("[1, 2]\n", "must be a mapping"),
            ("tls_cert: c.pem\n", "--tls-key"),
        ] {
            let err = serve_with(text, &[]).unwrap_err();
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }
}
