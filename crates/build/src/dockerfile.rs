//! A quick look at a Dockerfile before a builder runs: unknown instructions and a missing
//! `FROM` are reported with the file and line, instead of a builder's internal dump.

const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// A problem found in a Dockerfile, with its 1-based line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub message: String,
}

/// One logical instruction: its keyword, arguments and first line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instruction {
    pub keyword: String,
    pub arguments: String,
    pub line: usize,
}

fn escape_directive(text: &str) -> char {
    for line in text.lines() {
        let trimmed = line.trim();
        let Some(directive) = trimmed.strip_prefix('#') else {
            break;
        };
        let directive = directive.trim();
        match directive.split_once('=') {
            Some((key, value)) if key.trim().eq_ignore_ascii_case("escape") => {
                return value.trim().chars().next().unwrap_or('\\');
            }
            Some(_) => continue,
            None => break,
        }
    }
    '\\'
}

/// Splits a Dockerfile into instructions (continuation lines joined, comments and
/// heredoc bodies skipped).
pub fn instructions(text: &str) -> Vec<Instruction> {
    let escape = escape_directive(text);
    let mut result = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((index, raw)) = lines.next() {
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut joined = String::new();
        let mut current = trimmed.to_string();
        loop {
            let continued = current.ends_with(escape);
            if continued {
                current.pop();
            }
            joined.push_str(&current);
            joined.push(' ');
            if !continued {
                break;
            }
            // Comment lines inside a continuation are dropped, as Docker does.
            let mut next = None;
            for (_, line) in lines.by_ref() {
                let t = line.trim();
                if t.starts_with('#') {
                    continue;
                }
                next = Some(t.to_string());
                break;
            }
            match next {
                Some(line) => current = line,
                None => break,
            }
        }
        let joined = joined.trim().to_string();
        let (keyword, arguments) = joined
            .split_once(char::is_whitespace)
            .map(|(k, a)| (k.to_string(), a.trim().to_string()))
            .unwrap_or((joined.clone(), String::new()));
        // Heredocs (`RUN <<EOF ... EOF`): skip their bodies.
        for marker in arguments
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("<<"))
        {
            let delimiter = marker
                .trim_start_matches('-')
                .trim_matches(|c| c == '"' || c == '\'');
            if delimiter.is_empty() {
                continue;
            }
            for (_, line) in lines.by_ref() {
                if line.trim() == delimiter {
                    break;
                }
            }
        }
        result.push(Instruction {
            keyword: keyword.to_uppercase(),
            arguments,
            line: index + 1,
        });
    }
    result
}

/// Problems a builder would stop at: an unknown instruction, no `FROM` first, an
/// instruction that needs arguments without them.
pub fn check(text: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut seen_from = false;
    for instruction in instructions(text) {
        if !INSTRUCTIONS.contains(&instruction.keyword.as_str()) {
            problems.push(Problem {
                line: instruction.line,
                message: format!("unknown instruction: {}", instruction.keyword),
            });
            continue;
        }
        if instruction.arguments.is_empty() {
            problems.push(Problem {
                line: instruction.line,
                message: format!("{} requires at least one argument", instruction.keyword),
            });
            continue;
        }
        match instruction.keyword.as_str() {
            "FROM" => seen_from = true,
            "ARG" => {}
            other if !seen_from => {
                problems.push(Problem { line: instruction.line, message: format!("{other} before the first FROM: a Dockerfile must start with FROM (ARG may come first)") });
            }
            _ => {}
        }
    }
    if !seen_from && problems.is_empty() {
        problems.push(Problem {
            line: 1,
            message:
                "no FROM instruction: a Dockerfile must name a base image (FROM scratch for none)"
                    .into(),
        });
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_dockerfile_has_no_problems() {
        let text = "# syntax=docker/dockerfile:1\nARG BASE=scratch\nFROM ${BASE} AS build\nRUN echo a \\\n  # a comment\n  && echo b\nRUN <<EOF\nnot an instruction\nEOF\nCOPY --from=build /a /a\ncmd [\"/a\"]\n";
        assert_eq!(check(text), vec![]);
        let keywords: Vec<String> = instructions(text)
            .into_iter()
            .map(|i| format!("{}@{}", i.keyword, i.line))
            .collect();
        assert_eq!(
            keywords,
            vec!["ARG@2", "FROM@3", "RUN@4", "RUN@7", "COPY@10", "CMD@11"]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert_eq!(
            check("FROM scratch\nCOPYY a /a\n"),
            vec![Problem {
                line: 2,
                message: "unknown instruction: COPYY".into()
            }]
        );
        assert_eq!(
            check("COPY a /a\n")[0].message,
            "COPY before the first FROM: a Dockerfile must start with FROM (ARG may come first)"
        );
        assert_eq!(
            check("FROM\n")[0],
            Problem {
                line: 1,
                message: "FROM requires at least one argument".into()
            }
        );
        assert!(
            check("# nothing\n")[0]
                .message
                .starts_with("no FROM instruction")
        );
        assert_eq!(check("# escape=`\nFROM scratch\nCOPY a `\n  /a\n"), vec![]);
    }
}
