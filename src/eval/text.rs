//! Text clean-up applied to every raw record before deduplication and splitting: overstrike
//! removal, fortune attributions, whitespace, length. The cleaned text is what a model sees and
//! what the split hashes, so this step must stay deterministic.

/// How one task's texts are cleaned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextRules {
    /// Longest text kept, in characters; longer texts are cut (at a word boundary when one is
    /// near the end).
    pub max_chars: usize,
    /// Keep line breaks (ASCII-art digits need them); otherwise every whitespace run becomes one
    /// space.
    pub keep_newlines: bool,
    /// Drop a trailing fortune attribution (a line starting with `--` after indentation).
    pub strip_attribution: bool,
}

/// Cleans one raw text by `rules`.
pub fn clean(raw: &str, rules: TextRules) -> String {
    let mut text = remove_overstrike(raw);
    if rules.strip_attribution {
        text = strip_attribution(&text);
    }
    let text = if rules.keep_newlines {
        tidy_lines(&text)
    } else {
        collapse_whitespace(&text)
    };
    truncate(&text, rules.max_chars)
}

/// Applies backspaces the way a terminal would (`_\x08a` prints `a`), and drops other control
/// characters except line breaks and tabs.
fn remove_overstrike(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        match c {
            '\u{8}' => {
                out.pop();
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Cuts the text at its first attribution line (`\t\t-- Author`), keeping what comes before.
fn strip_attribution(text: &str) -> String {
    let mut kept = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indented = trimmed.len() < line.len();
        if trimmed.starts_with("--") && (indented || !kept.is_empty()) {
            break;
        }
        kept.push(line);
    }
    kept.join("\n")
}

fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn tidy_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
    lines.join("\n").trim_matches('\n').to_owned()
}

/// Cuts to at most `max_chars` characters, backing up to the last space if it lies in the final
/// fifth of the kept text.
fn truncate(text: &str, max_chars: usize) -> String {
    let Some((cut, _)) = text.char_indices().nth(max_chars) else {
        return text.to_owned();
    };
    let head = &text[..cut];
    match head.rfind(' ') {
        Some(space) if space >= cut - cut / 5 => head[..space].to_owned(),
        _ => head.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: TextRules = TextRules {
        max_chars: 40,
        keep_newlines: false,
        strip_attribution: true,
    };

    #[test]
    fn overstrike_and_attribution_are_removed() {
        let raw =
            "A _\u{8}b_\u{8}o_\u{8}l_\u{8}d claim,\n  spread over lines.\n\t\t-- Someone, 1999\n";
        assert_eq!(clean(raw, RULES), "A bold claim, spread over lines.");
    }

    #[test]
    fn a_dash_line_that_opens_the_text_is_kept() {
        assert_eq!(
            clean("-- not an attribution", RULES),
            "-- not an attribution"
        );
    }

    #[test]
    fn long_texts_are_cut_at_a_word_boundary() {
        let text = clean("one two three four five six seven eight nine ten", RULES);
        assert_eq!(text, "one two three four five six seven eight");
        let no_space = clean(&"x".repeat(100), RULES);
        assert_eq!(no_space.chars().count(), 40);
        let multibyte = clean(&"ж".repeat(100), RULES);
        assert_eq!(multibyte.chars().count(), 40);
    }

    #[test]
    fn newlines_survive_when_asked() {
        let rules = TextRules {
            keep_newlines: true,
            strip_attribution: false,
            max_chars: 100,
        };
        assert_eq!(clean("\n@@ \n#@\r\n\n", rules), "@@\n#@");
    }
}
