//! `/data/macrescue/config.toml`: the owner's settings on the data partition.
//!
//! Only the small TOML subset a person writes by hand is understood: `[section]` headers,
//! `key = "string"`, `key = 'literal'`, integers and booleans, one-line arrays of strings,
//! `#` comments. A line we cannot read is reported and skipped instead of failing the whole
//! file: a typo in one setting must
//! not stop the station from starting.

use thiserror::Error;

/// One `section.key = value` setting; the value is kept as text (settings parse it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Dotted key: `init.station` for `station` under `[init]`, `proxy` at the top.
    pub key: String,
    pub value: String,
    pub line: usize,
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config line {line}: {reason}; the line is ignored (expected key = \"value\")")]
    Line { line: usize, reason: &'static str },
}

/// Every readable entry and every line that was skipped.
pub fn parse(text: &str) -> (Vec<Entry>, Vec<ConfigError>) {
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    let mut section = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let Some(name) = strip_comment(rest).trim_end().strip_suffix(']') else {
                errors.push(ConfigError::Line {
                    line,
                    reason: "section header without a closing ]",
                });
                continue;
            };
            let name = name.trim();
            if !valid_key(name) {
                errors.push(ConfigError::Line {
                    line,
                    reason: "section name with characters other than letters, digits, _ - .",
                });
                continue;
            }
            section = name.to_string();
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            errors.push(ConfigError::Line {
                line,
                reason: "no = in the line",
            });
            continue;
        };
        let key = key.trim();
        if !valid_key(key) {
            errors.push(ConfigError::Line {
                line,
                reason: "key with characters other than letters, digits, _ - .",
            });
            continue;
        }
        match parse_value(value.trim()) {
            Ok(value) => entries.push(Entry {
                key: if section.is_empty() {
                    key.to_string()
                } else {
                    format!("{section}.{key}")
                },
                value,
                line,
            }),
            Err(reason) => errors.push(ConfigError::Line { line, reason }),
        }
    }
    (entries, errors)
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Cut a trailing `# comment` (outside quotes: callers only use this where no quotes remain).
fn strip_comment(s: &str) -> &str {
    s.split_once('#').map_or(s, |(before, _)| before)
}

fn parse_value(v: &str) -> Result<String, &'static str> {
    if let Some((text, after)) = quoted(v)? {
        only_comment_after(after).map(|()| text)
    } else if let Some(rest) = v.strip_prefix('[') {
        parse_array(rest)
    } else {
        let bare = strip_comment(v).trim();
        if bare == "true" || bare == "false" {
            return Ok(bare.to_string());
        }
        let digits = bare
            .strip_prefix(['-', '+'])
            .unwrap_or(bare)
            .replace('_', "");
        if !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit()) {
            return Ok(bare.replace('_', "").trim_start_matches('+').to_string());
        }
        Err("value is not a quoted string, an integer or true/false")
    }
}

/// A `"basic"` or `'literal'` string at the start of `v`: its text and what follows it;
/// `None` when `v` does not start with a quote.
fn quoted(v: &str) -> Result<Option<(String, &str)>, &'static str> {
    if let Some(rest) = v.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => return Ok(Some((out, chars.as_str()))),
                '\\' => match chars.next() {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    _ => return Err("unknown escape in a \"string\" (use \\\\ for a backslash)"),
                },
                c => out.push(c),
            }
        }
        Err("string without its closing \"")
    } else if let Some(rest) = v.strip_prefix('\'') {
        let Some((body, after)) = rest.split_once('\'') else {
            return Err("string without its closing '");
        };
        Ok(Some((body.to_string(), after)))
    } else {
        Ok(None)
    }
}

/// A one-line array of strings (`["a:1", 'b:2']`, the station's lists), kept as the items
/// joined with `, `: the init only needs to know whether such a setting is there, and the
/// station reads the file itself.
fn parse_array(mut rest: &str) -> Result<String, &'static str> {
    let mut items = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix(']') {
            let after = after.trim();
            return if after.is_empty() || after.starts_with('#') {
                Ok(items.join(", "))
            } else {
                Err("text after the closing ]")
            };
        }
        let Some((item, after)) = quoted(rest)? else {
            return Err("array item is not a quoted string (arrays must be on one line)");
        };
        items.push(item);
        rest = after.trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with(']') {
            return Err("array items must be separated by , and the array closed with ]");
        }
    }
}

fn only_comment_after(after: &str) -> Result<(), &'static str> {
    let after = after.trim();
    if after.is_empty() || after.starts_with('#') {
        Ok(())
    } else {
        Err("text after the closing quote")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(entries: &[Entry]) -> Vec<(&str, &str)> {
        entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
            .collect()
    }

    #[test]
    fn reads_sections_strings_numbers_and_booleans() {
        let text = "# macrescue settings\n\
                    proxy = \"http://10.0.0.1:3128\"  # office proxy\n\
                    \n\
                    [init]\n\
                    station = \"restore-agent station --verbose\"\n\
                    shell = 'tty3'\n\
                    data_wait = 1_5\n\
                    restart_max = +60\n\
                    debug = true\n\
                    [ net.wifi ] # later\n\
                    ssid = \"Say \\\"hi\\\"\\\\\"\n";
        let (entries, errors) = parse(text);
        assert_eq!(errors, vec![]);
        assert_eq!(
            kv(&entries),
            vec![
                ("proxy", "http://10.0.0.1:3128"),
                ("init.station", "restore-agent station --verbose"),
                ("init.shell", "tty3"),
                ("init.data_wait", "15"),
                ("init.restart_max", "60"),
                ("init.debug", "true"),
                ("net.wifi.ssid", "Say \"hi\"\\"),
            ]
        );
        assert_eq!(entries[1].line, 5);
    }

    #[test]
    fn reads_the_stations_one_line_arrays_without_a_warning() {
        let text = "[station]\n\
                    usbip = [\"10.0.2.100:3240\", 'b:2'] # the lab\n\
                    consoles = [ ]\n\
                    [net]\n\
                    ntp = [\"a\",]\n";
        let (entries, errors) = parse(text);
        assert_eq!(errors, vec![]);
        assert_eq!(
            kv(&entries),
            vec![
                ("station.usbip", "10.0.2.100:3240, b:2"),
                ("station.consoles", ""),
                ("net.ntp", "a"),
            ]
        );
        let (entries, errors) = parse("a = [\"x\"\nb = [1, 2]\nc = [\"x\" \"y\"]\nd = [] z\n");
        assert_eq!(entries, vec![]);
        let reasons: Vec<&str> = errors
            .iter()
            .map(|ConfigError::Line { reason, .. }| *reason)
            .collect();
        assert_eq!(
            reasons,
            vec![
                "array items must be separated by , and the array closed with ]",
                "array item is not a quoted string (arrays must be on one line)",
                "array items must be separated by , and the array closed with ]",
                "text after the closing ]",
            ]
        );
    }

    #[test]
    fn skips_bad_lines_and_keeps_the_rest() {
        let text = "[init\nstation\nshell = tty2\n= \"x\"\nname = \"open\nok = 1\n\
                    s = \"a\" b\nk y = 1\nesc = \"\\q\"\n[bad section]\nlast = 'x' # fine\n";
        let (entries, errors) = parse(text);
        assert_eq!(kv(&entries), vec![("ok", "1"), ("last", "x")]);
        let lines: Vec<usize> = errors
            .iter()
            .map(|ConfigError::Line { line, .. }| *line)
            .collect();
        assert_eq!(lines, vec![1, 2, 3, 4, 5, 7, 8, 9, 10]);
        assert_eq!(
            errors[2].to_string(),
            "config line 3: value is not a quoted string, an integer or true/false; \
             the line is ignored (expected key = \"value\")"
        );
    }

    #[test]
    fn never_panics() {
        for s in [
            "\"",
            "=",
            "[",
            "]",
            "a=\"\\",
            "a='",
            "a=-",
            "\u{feff}x = 1",
            "[]\n[.]",
        ] {
            let _ = parse(s);
        }
    }
}
