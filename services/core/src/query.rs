//! Query-string pieces every edge reads the same way: topic lists, single
//! parameters and positions.

use actix_web::{dev::RequestHead, web};

use crate::{ApiError, Position, Topic, event::PositionError};

/// Raw query pairs, in order (repeated keys such as `topic` allowed).
pub type QueryPairs = web::Query<Vec<(String, String)>>;

/// A request's query pairs, refused as the [`QueryPairs`] extractor refuses
/// them (routes served outside actix-web's extractors read them here).
pub fn pairs(head: &RequestHead) -> Result<Vec<(String, String)>, ApiError> {
    QueryPairs::from_query(head.uri.query().unwrap_or_default())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::bad_request("invalid_query", e.to_string()))
}

/// The `topic=` parameters, deduplicated, checked to be 1 to `max` names.
pub fn topics(query: &[(String, String)], max: usize) -> Result<Vec<Topic>, ApiError> {
    let mut topics = Vec::new();
    for (_, name) in query.iter().filter(|(k, _)| k == "topic") {
        let topic = Topic::parse(name)?;
        if !topics.contains(&topic) {
            topics.push(topic);
        }
    }
    check_topic_count(&topics, max)?;
    Ok(topics)
}

/// Checks that a request names 1 to `max` topics.
pub fn check_topic_count(topics: &[Topic], max: usize) -> Result<(), ApiError> {
    if topics.is_empty() {
        return Err(ApiError::bad_request(
            "missing_topic",
            "name at least one topic (topic=a&topic=b)",
        ));
    }
    if topics.len() > max {
        return Err(ApiError::bad_request(
            "too_many_topics",
            format!("{} topics named; the maximum is {max}", topics.len()),
        ));
    }
    Ok(())
}

/// The value of a parameter that may appear at most once.
pub fn single(query: &[(String, String)], key: &str) -> Result<Option<String>, ApiError> {
    let mut values = query.iter().filter(|(k, _)| k == key).map(|(_, v)| v);
    let first = values.next().cloned();
    if values.next().is_some() {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("{key} may be given once"),
        ));
    }
    Ok(first)
}

/// Parses a position whose topics must all be among `topics`; errors carry `code`.
pub fn parse_position(
    value: &str,
    topics: &[Topic],
    code: &'static str,
) -> Result<Position, ApiError> {
    let position = Position::parse(value).map_err(|e: PositionError| {
        ApiError::bad_request(code, format!("{e} (expected a:12,b:40)"))
    })?;
    if let Some((stray, _)) = position.iter().find(|(t, _)| !topics.contains(t)) {
        return Err(ApiError::bad_request(
            code,
            format!("the position names topic {stray}, which is not among the topics asked for"),
        ));
    }
    Ok(position)
}
