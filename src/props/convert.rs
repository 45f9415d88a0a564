//! The request conversion: any `ChatRequest` a caller can send (and any bytes) converts or is
//! refused with a classified error, never INTERNAL, never a panic.

use proptest::{collection::vec, option, prelude::*};
use prost::Message as _;
use tonic::Code;

use crate::{error::GatewayError, pb, server::convert};

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9/._-]{1,12}",
        any::<String>(),
        // Long enough to pass the length limits.
        "[a-z]{250,300}",
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        -3.0f64..3.0,
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
    ]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![0..6i32, any::<i32>()]
}

fn value() -> impl Strategy<Value = prost_types::Value> {
    use prost_types::value::Kind;
    let leaf = prop_oneof![
        Just(None),
        Just(Some(Kind::NullValue(0))),
        float().prop_map(|f| Some(Kind::NumberValue(f))),
        text().prop_map(|s| Some(Kind::StringValue(s))),
        any::<bool>().prop_map(|b| Some(Kind::BoolValue(b))),
    ]
    .prop_map(|kind| prost_types::Value { kind });
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|values| prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(
                    prost_types::ListValue { values }
                )),
            }),
            proptest::collection::btree_map(text(), inner, 0..4).prop_map(|fields| {
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StructValue(prost_types::Struct {
                        fields,
                    })),
                }
            }),
        ]
    })
}

fn schema() -> impl Strategy<Value = prost_types::Struct> {
    proptest::collection::btree_map(text(), value(), 0..4)
        .prop_map(|fields| prost_types::Struct { fields })
}

fn part() -> impl Strategy<Value = pb::ContentPart> {
    use pb::content_part::Part;
    let image = (
        prop_oneof![
            text().prop_map(pb::image::Source::Url),
            vec(any::<u8>(), 0..32).prop_map(|b| pb::image::Source::Data(b.into())),
        ],
        prop_oneof![
            Just("image/png".to_owned()),
            Just("image/svg+xml".to_owned()),
            text()
        ],
        enum_value(),
    )
        .prop_map(|(source, mime_type, detail)| pb::Image {
            source: Some(source),
            mime_type,
            detail,
        });
    let part = prop_oneof![
        text().prop_map(Part::Text),
        image.prop_map(Part::Image),
        (
            text(),
            text(),
            prop_oneof![text(), Just("{\"a\":1}".to_owned())]
        )
            .prop_map(|(id, name, arguments)| Part::ToolCall(pb::ToolCall {
                id,
                name,
                arguments
            })),
        (text(), text(), any::<bool>(), text()).prop_map(
            |(tool_call_id, content, is_error, name)| Part::ToolResult(pb::ToolResult {
                tool_call_id,
                content,
                is_error,
                name,
            })
        ),
    ];
    option::weighted(0.95, part).prop_map(|part| pb::ContentPart { part })
}

fn message() -> impl Strategy<Value = pb::Message> {
    (enum_value(), vec(part(), 0..4), text()).prop_map(|(role, content, name)| pb::Message {
        role,
        content,
        name,
    })
}

fn tool() -> impl Strategy<Value = pb::Tool> {
    (text(), text(), option::of(schema()), any::<bool>()).prop_map(
        |(name, description, parameters, strict)| pb::Tool {
            name,
            description,
            parameters,
            strict,
        },
    )
}

fn chat_request() -> impl Strategy<Value = pb::ChatRequest> {
    let sampling = (
        option::of(float()),
        option::of(float()),
        option::of(any::<u32>()),
        vec(text(), 0..6),
        option::of(any::<i64>()),
        option::of(float()),
        option::of(float()),
    );
    let rest = (
        vec(tool(), 0..3),
        option::of(
            (enum_value(), text()).prop_map(|(mode, tool_name)| pb::ToolChoice { mode, tool_name }),
        ),
        option::of(
            (enum_value(), text(), option::of(schema()), any::<bool>()).prop_map(
                |(r#type, schema_name, schema, strict)| pb::ResponseFormat {
                    r#type,
                    schema_name,
                    schema,
                    strict,
                },
            ),
        ),
        proptest::collection::hash_map(text(), text(), 0..4),
        text(),
        option::of(any::<bool>()),
    );
    let model = prop_oneof![Just("mock/echo".to_owned()), text()];
    (model, vec(message(), 0..4), sampling, rest).prop_map(
        |(
            model,
            messages,
            (temperature, top_p, max_tokens, stop, seed, presence_penalty, frequency_penalty),
            (tools, tool_choice, response_format, tags, user, parallel_tool_calls),
        )| pb::ChatRequest {
            model,
            messages,
            temperature,
            top_p,
            max_tokens,
            stop,
            seed,
            presence_penalty,
            frequency_penalty,
            tools,
            tool_choice,
            response_format,
            tags,
            user,
            parallel_tool_calls,
        },
    )
}

/// The conversion's verdict is a clean one.
fn check(req: pb::ChatRequest) -> Result<(), TestCaseError> {
    match convert::chat_request(req) {
        Ok(_) => Ok(()),
        Err(err) => {
            prop_assert_ne!(err.code(), Code::Internal, "{}", err);
            if let GatewayError::InvalidArgument(violations) = &err {
                prop_assert!(!violations.is_empty());
                for v in violations {
                    prop_assert!(!v.field.is_empty() && !v.description.is_empty());
                }
            }
            Ok(())
        }
    }
}

/// What the codec does with request bytes, then the conversion.
fn check_bytes(bytes: &[u8]) -> Result<(), TestCaseError> {
    match pb::ChatRequest::decode(bytes) {
        Ok(req) => check(req),
        Err(err) => {
            let status = crate::codec::decode_error(&err);
            prop_assert_eq!(status.code(), Code::InvalidArgument);
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(super::config())]

    #[test]
    fn any_request_converts_or_is_refused_cleanly(req in chat_request()) {
        check(req)?;
    }

    #[test]
    fn any_bytes_decode_and_convert_or_are_refused_cleanly(bytes in vec(any::<u8>(), 0..256)) {
        check_bytes(&bytes)?;
    }

    #[test]
    fn damaged_requests_are_refused_cleanly(
        req in chat_request(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = req.encode_to_vec();
        if !bytes.is_empty() {
            for (at, byte) in flips {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        check_bytes(&bytes)?;
    }
}
