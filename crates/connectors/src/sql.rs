//! SQL identifier checking and quoting: every table and column name sluice puts in SQL goes
//! through `quote_ident`, so a hostile name is a name and never syntax.

use crate::error::ConnectorError;

/// Checks that `name` can be a PostgreSQL identifier: 1 to 63 bytes, no NUL, no control
/// characters. A bad name is a configuration error.
pub fn check_identifier(name: &str) -> Result<(), ConnectorError> {
    if name.is_empty() {
        return Err(ConnectorError::config("is empty"));
    }
    if name.len() > 63 {
        return Err(ConnectorError::config(format!("`{name}` is {} bytes; PostgreSQL truncates identifiers past 63", name.len())));
    }
    if name.chars().any(|c| c == '\0' || c.is_control()) {
        return Err(ConnectorError::config(format!("`{}` holds a NUL or control character", name.escape_debug())));
    }
    Ok(())
}

/// Quotes an identifier for PostgreSQL: wrapped in double quotes, inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `"schema"."table"`.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote_ident(r#"a"; DROP TABLE x; --"#), r#""a""; DROP TABLE x; --""#);
        assert_eq!(qualified("public", "t"), r#""public"."t""#);
    }

    #[test]
    fn control_characters_and_long_names_are_refused() {
        assert!(check_identifier("ok name").is_ok());
        assert!(check_identifier("bad\0").is_err());
        assert!(check_identifier("line\nbreak").is_err());
        assert!(check_identifier(&"x".repeat(64)).is_err());
        assert!(check_identifier("").is_err());
    }
}
