//! The path a request's policy decision sees, and that the application then receives: one
//! spelling per resource, so that `/public/../admin`, `//admin` or `/%61dmin` cannot slip past
//! a rule on `/admin*` to an application that reads them all as `/admin` (Istio's normalization
//! `MERGE_SLASHES` with the RFC 3986 one). Percent-encoded characters that are not unreserved
//! (`%2F`, `%5C`, `%00`...) are kept encoded: decoding `%2F` would change which resource is
//! named.

use std::borrow::Cow;

/// The normalized form of `path` (no query): unreserved characters percent-decoded, `.` and
/// `..` segments removed, runs of `/` merged. Borrowed when already normal.
pub fn normalize(path: &str) -> Cow<'_, str> {
    let needs = path.contains("//")
        || path.contains('%')
        || path.split('/').any(|s| s == "." || s == "..")
        || !path.starts_with('/');
    if !needs {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "."
        || decoded == "..";
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len() + 1);
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `%XX` for an unreserved character (RFC 3986: letters, digits, `-._~`) decoded; any other
/// escape kept, with upper-case hex digits.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let byte = (hi * 16 + lo) as u8;
                if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                    out.push(byte as char);
                } else {
                    out.push('%');
                    out.push(bytes[i + 1].to_ascii_uppercase() as char);
                    out.push(bytes[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        // A path is ASCII (`http::Uri` refuses anything else).
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_per_resource() {
        for (path, normal) in [
            ("/public/index.html", "/public/index.html"),
            ("/", "/"),
            ("/public/../admin", "/admin"),
            ("/public/./a/", "/public/a/"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a/%2E%2E/admin", "/admin"),
            ("/admin%2fx", "/admin%2Fx"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            ("/../../x", "/x"),
            ("/a%", "/a%"),
            ("/a%zz", "/a%zz"),
            ("/%7euser", "/~user"),
        ] {
            assert_eq!(normalize(path), normal, "{path}");
        }
        assert!(matches!(normalize("/a/b"), Cow::Borrowed(_)));
    }
}
