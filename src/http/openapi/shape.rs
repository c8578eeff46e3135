//! The generated document made into the one served: what utoipa's
//! annotations cannot say (events by their type, links between
//! operations, optional bodies and parameters) written onto its JSON.

/// What a created resource leads to: OpenAPI links from an operation's
/// success answers to the operations that use what it made (so that a
/// client, or schemathesis's stateful phase, goes create → use →
/// delete). Each: the operation (method, path), its statuses, and the
/// operations linked with the parameters they take from it.
pub(super) type Link = (
    &'static str,
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

pub(super) const LINKS: &[Link] = &[
    (
        "put",
        "/v1/entitlements/{id}",
        &["200", "201"],
        &[
            "get_entitlement",
            "list_seats",
            "activate_seat",
            "record_usage",
            "entitlement_history",
            "entitlement_periods",
            "create_portal_link",
            "revoke_portal_links",
            "delete_entitlement",
        ],
        &[("id", "$request.path.id")],
    ),
    (
        "post",
        "/v1/entitlements/{id}/seats/{seat_id}",
        &["200"],
        &["release_seat"],
        &[
            ("id", "$request.path.id"),
            ("seat_id", "$request.path.seat_id"),
        ],
    ),
    (
        "post",
        "/v1/webhooks",
        &["201"],
        &[
            "get_webhook",
            "webhook_deliveries",
            "rotate_webhook_secret",
            "delete_webhook",
        ],
        &[("id", "$response.body#/id")],
    ),
];

fn links(doc: &mut serde_json::Value) {
    use serde_json::{Map, Value};
    for (method, path, statuses, targets, params) in LINKS {
        let parameters: Map<String, Value> = params
            .iter()
            .map(|(name, from)| (name.to_string(), Value::from(*from)))
            .collect();
        let links: Map<String, Value> = targets
            .iter()
            .map(|op| {
                let link = serde_json::json!({"operationId": op, "parameters": parameters});
                (op.to_string(), link)
            })
            .collect();
        for status in *statuses {
            let pointer = format!(
                "/paths/{}/{method}/responses/{status}",
                path.replace('~', "~0").replace('/', "~1")
            );
            // A test checks that each exists (`every_link_leads_somewhere`).
            if let Some(answer) = doc.pointer_mut(&pointer).and_then(Value::as_object_mut) {
                answer.insert("links".into(), Value::Object(links.clone()));
            }
        }
    }
}

/// A summary taken from a handler's comment that begins by naming its
/// route ("`GET /v1/events`: the events…"), without the route, which
/// readers of the document see next to it already.
fn without_route(summary: &mut serde_json::Value) {
    let Some(text) = summary.as_str() else {
        return;
    };
    let Some(rest) = text
        .strip_prefix('`')
        .and_then(|t| t.split_once("`: "))
        .filter(|(route, _)| route.contains(" /"))
        .map(|(_, rest)| rest)
    else {
        return;
    };
    let mut chars = rest.chars();
    if let Some(first) = chars.next() {
        *summary = serde_json::Value::String(first.to_uppercase().chain(chars).collect());
    }
}

/// A schema that utoipa wrote "T or null" for an `Option<T>`, as T.
fn not_null(schema: &mut serde_json::Value) -> bool {
    if let Some(types) = schema.get_mut("type").and_then(|t| t.as_array_mut()) {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types[0].clone();
            schema["type"] = only;
        }
        return true;
    }
    let inner = schema
        .get("oneOf")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2 && o[1] == serde_json::json!({"type": "null"}))
        .map(|o| o[0].clone());
    match inner {
        Some(inner) => {
            *schema = inner;
            true
        }
        None => false,
    }
}

/// Every `u64` of the API as what it is: utoipa writes them `int64` with
/// minimum 0, whose range ends at 2^63 - 1; the API takes up to 2^64 - 1.
fn unsigned(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let integer = match map.get("type") {
                Some(serde_json::Value::String(t)) => t == "integer",
                Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer
                && map.get("format").is_some_and(|f| f == "int64")
                && map.get("minimum").is_some_and(|m| m == 0)
            {
                map.insert("format".into(), "uint64".into());
                if !map.contains_key("maximum") {
                    map.insert("maximum".into(), u64::MAX.into());
                }
            }
            map.values_mut().for_each(unsigned);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unsigned),
        _ => {}
    }
}

/// What utoipa generates, made into the document served: unsigned
/// integers, events by type, links, summaries without their route.
/// Optional bodies and parameters are written `Option<T>` in the
/// annotations, which utoipa renders as "T or null"; a route takes no body
/// or a T, never `null`, and a header or query parameter cannot be null,
/// so those are made "T, not required".
pub(super) fn apply(doc: &mut serde_json::Value) {
    unsigned(doc);
    events_by_type(doc);
    links(doc);
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        for operation in paths
            .values_mut()
            .filter_map(|i| i.as_object_mut())
            .flat_map(|i| i.values_mut())
        {
            if let Some(summary) = operation.get_mut("summary") {
                without_route(summary);
            }
            if let Some(params) = operation
                .get_mut("parameters")
                .and_then(|p| p.as_array_mut())
            {
                for param in params {
                    if let Some(schema) = param.get_mut("schema") {
                        not_null(schema);
                    }
                }
            }
            let Some(body) = operation.get_mut("requestBody") else {
                continue;
            };
            let Some(content) = body.get_mut("content").and_then(|c| c.as_object_mut()) else {
                continue;
            };
            let mut optional = false;
            for media in content.values_mut() {
                let Some(schema) = media.get_mut("schema") else {
                    continue;
                };
                if schema.get("oneOf").is_some() && not_null(schema) {
                    optional = true;
                }
                if schema.get("$ref").and_then(|r| r.as_str())
                    == Some("#/components/schemas/NoFields")
                {
                    optional = true;
                }
            }
            if optional {
                body["required"] = serde_json::Value::Bool(false);
            }
        }
    }
}

/// `EventData` is untagged, so utoipa documents it as one `oneOf` whose
/// variants overlap (`{"in_use", "hard_cap"}` fits two). The event's
/// `type` says which it is: `CloudEvent` becomes a `oneOf` over the event
/// types (discriminated by `type`), each with its own `data` schema
/// (`SeatDeniedData`, …: exactly the fields written, nothing more).
fn events_by_type(doc: &mut serde_json::Value) {
    use serde_json::{Value, json};
    let Some(schemas) = doc
        .pointer_mut("/components/schemas")
        .and_then(Value::as_object_mut)
    else {
        return;
    };
    let variants = match schemas.remove("EventData") {
        Some(Value::Object(mut data)) => match data.remove("oneOf") {
            Some(Value::Array(v)) => v,
            _ => return,
        },
        _ => return,
    };
    let Some(Value::Object(mut base)) = schemas.remove("CloudEvent") else {
        return;
    };
    if let Some(props) = base.get_mut("properties").and_then(Value::as_object_mut) {
        props.remove("data");
        props.remove("type");
    }
    base.insert(
        "description".into(),
        json!("What every event has in common."),
    );
    schemas.insert("CloudEventBase".into(), Value::Object(base));
    let mut one_of = Vec::new();
    let mut mapping = serde_json::Map::new();
    for (kind, mut data) in crate::domain::EVENT_KINDS.iter().zip(variants) {
        let name: String = kind
            .split(['.', '_'])
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect();
        if let Some(d) = data.as_object_mut() {
            d.insert("additionalProperties".into(), Value::Bool(false));
            d.insert(
                "description".into(),
                json!(format!("The `data` of `{kind}`.")),
            );
        }
        schemas.insert(format!("{name}Data"), data);
        let event = json!({
            "description": format!("A `{kind}` event."),
            "allOf": [
                {"$ref": "#/components/schemas/CloudEventBase"},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": kind},
                        "data": {"$ref": format!("#/components/schemas/{name}Data")},
                    },
                    "required": ["type", "data"],
                },
            ],
        });
        schemas.insert(format!("{name}Event"), event);
        let reference = format!("#/components/schemas/{name}Event");
        one_of.push(json!({"$ref": reference}));
        mapping.insert(kind.to_string(), Value::String(reference));
    }
    schemas.insert(
        "CloudEvent".into(),
        json!({
            "description": "An event as the stream and the webhooks carry it: a CloudEvents 1.0 \
                document (`Content-Type: application/cloudevents+json` on webhooks), its `data` \
                by its `type`.",
            "oneOf": one_of,
            "discriminator": {"propertyName": "type", "mapping": mapping},
        }),
    );
}
