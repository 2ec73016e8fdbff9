//! Configured route patterns (`--route-pattern /users/{id}/orders`): a server request whose path
//! matches one is named `{method} {pattern}` and carries `http.route`, as the semantic conventions
//! ask (the route comes from the application's own routing, which only a person can tell an
//! agent); other requests keep the generalised path of `span::route`.
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "bad route pattern `{0}`: expected a path starting with `/`, segments literal or `{{name}}`, and `{{*name}}` only last"
)]
pub struct RouteError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}`: any one segment.
    Param,
    /// `{*name}`: the rest of the path, one segment or more.
    Rest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    pub text: String,
    segments: Vec<Segment>,
}

impl RoutePattern {
    pub fn parse(s: &str) -> Result<Self, RouteError> {
        let bad = || RouteError(s.to_owned());
        let body = s.strip_prefix('/').ok_or_else(bad)?;
        let parts: Vec<&str> = body.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = match part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                Some(name) if name.starts_with('*') && i + 1 == parts.len() && name.len() > 1 => Segment::Rest,
                Some(name) if !name.is_empty() && !name.contains(['{', '}', '*']) => Segment::Param,
                Some(_) => return Err(bad()),
                None if part.contains(['{', '}']) => return Err(bad()),
                None => Segment::Literal((*part).to_owned()),
            };
            segments.push(seg);
        }
        Ok(Self {
            text: s.to_owned(),
            segments,
        })
    }

    /// Whether `path` (without its query) is this route.
    pub fn matches(&self, path: &str) -> bool {
        let Some(body) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = body.split('/');
        for seg in &self.segments {
            match seg {
                Segment::Rest => return parts.next().is_some_and(|p| !p.is_empty()),
                Segment::Param => {
                    if parts.next().is_none_or(|p| p.is_empty()) {
                        return false;
                    }
                }
                Segment::Literal(l) => {
                    if parts.next() != Some(l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// The first of `patterns` that `path` matches.
pub fn first_match<'a>(patterns: &'a [RoutePattern], path: &str) -> Option<&'a RoutePattern> {
    patterns.iter().find(|p| p.matches(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_paths() {
        let p = RoutePattern::parse("/users/{id}/orders").unwrap();
        assert!(p.matches("/users/42/orders"));
        assert!(!p.matches("/users/42/orders/7"));
        assert!(!p.matches("/users//orders"));
        assert!(!p.matches("/users/42"));
        assert!(!p.matches("users/42/orders"));
        let rest = RoutePattern::parse("/static/{*file}").unwrap();
        assert!(rest.matches("/static/css/site.css") && rest.matches("/static/a"));
        assert!(!rest.matches("/static/") && !rest.matches("/static"));
        let root = RoutePattern::parse("/").unwrap();
        assert!(root.matches("/") && !root.matches("/a"));
        let pats = vec![
            RoutePattern::parse("/users/me").unwrap(),
            RoutePattern::parse("/users/{id}").unwrap(),
        ];
        assert_eq!(
            first_match(&pats, "/users/me").map(|p| p.text.as_str()),
            Some("/users/me")
        );
        assert_eq!(
            first_match(&pats, "/users/7").map(|p| p.text.as_str()),
            Some("/users/{id}")
        );
        assert_eq!(first_match(&pats, "/teams/7"), None);
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in [
            "users/{id}",
            "/users/{}",
            "/a/{*rest}/b",
            "/a/{x",
            "/a/x}",
            "/a/{{x}}",
            "/a/{*}",
        ] {
            assert!(RoutePattern::parse(bad).is_err(), "{bad}");
        }
    }
}
