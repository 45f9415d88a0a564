//! Authorization by construction: every RPC the server's reflection describes is in the
//! authorization table, and every one of them, called with no credential, a wrong one, the
//! admin token and a key of each scope, answers as the table says.

use std::collections::BTreeSet;

use llm_gateway::{
    pb,
    server::authz::{self, Requirement},
};
use prost::Message as _;
use tonic::{Code, transport::Channel};

use crate::common::*;

/// Lists the services of one reflection version and the methods of each, as
/// `(/package.Service/Method, client streaming)`.
macro_rules! walk_reflection {
    ($module:path, $channel:expr) => {{
        use r::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        use $module as r;
        let mut client = ServerReflectionClient::new($channel.clone());
        let ask = |request: MessageRequest| r::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request),
        };
        let mut answers = client
            .server_reflection_info(futures_util::stream::once(async move {
                ask(MessageRequest::ListServices(String::new()))
            }))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            answers.message().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let mut paths = Vec::new();
        for service in list.service {
            let name = service.name;
            let asked = name.clone();
            let mut answers = client
                .server_reflection_info(futures_util::stream::once(async move {
                    ask(MessageRequest::FileContainingSymbol(asked))
                }))
                .await
                .unwrap()
                .into_inner();
            let Some(MessageResponse::FileDescriptorResponse(files)) =
                answers.message().await.unwrap().unwrap().message_response
            else {
                panic!("no descriptor for {name}");
            };
            let mut found = false;
            for bytes in files.file_descriptor_proto {
                let file = prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap();
                for s in &file.service {
                    if format!("{}.{}", file.package(), s.name()) == name {
                        found = true;
                        for m in &s.method {
                            paths.push((format!("/{name}/{}", m.name()), m.client_streaming()));
                        }
                    }
                }
            }
            assert!(found, "reflection has no descriptor for {name}");
        }
        paths
    }};
}

/// Every RPC the server describes through both reflection versions.
async fn served_paths(channel: &Channel) -> BTreeSet<(String, bool)> {
    let mut paths: BTreeSet<(String, bool)> = walk_reflection!(tonic_reflection::pb::v1, channel)
        .into_iter()
        .collect();
    paths.extend(walk_reflection!(tonic_reflection::pb::v1alpha, channel));
    paths
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    Nothing,
    Wrong,
    AdminToken,
    ChatKey,
    UsageKey,
    AdminKey,
}

const CREDENTIALS: [Credential; 6] = [
    Credential::Nothing,
    Credential::Wrong,
    Credential::AdminToken,
    Credential::ChatKey,
    Credential::UsageKey,
    Credential::AdminKey,
];

/// What the table promises: `None` = allowed, `Some(code)` = refused with `code`.
fn expected(requires: Requirement, credential: Credential, keys_required: bool) -> Option<Code> {
    use Credential::*;
    let unauthenticated = Some(Code::Unauthenticated);
    let denied = Some(Code::PermissionDenied);
    match (requires, credential) {
        (Requirement::None, _) => None,
        (Requirement::Chat, Nothing) if keys_required => unauthenticated,
        (Requirement::Chat, Nothing) => None,
        // The admin token is no api key.
        (Requirement::Chat, Wrong | AdminToken) => unauthenticated,
        (Requirement::Chat, ChatKey) => None,
        (Requirement::Chat, UsageKey | AdminKey) => denied,
        (Requirement::UsageRead | Requirement::Admin, Nothing | Wrong) => unauthenticated,
        (Requirement::UsageRead | Requirement::Admin, AdminToken | AdminKey) => None,
        (Requirement::UsageRead, UsageKey) => None,
        (Requirement::UsageRead | Requirement::Admin, ChatKey) => denied,
        (Requirement::Admin, UsageKey) => denied,
    }
}

async fn secret(admin: &mut Admin, name: &str, scope: &str) -> String {
    admin
        .create_key(pb::CreateKeyRequest {
            key: Some(pb::Key {
                name: name.into(),
                scopes: vec![scope.into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .secret
}

async fn check_every_rpc(keys_required: bool) {
    let gateway = Gateway::start(if keys_required {
        "[auth]\nrequire_keys = true\n"
    } else {
        ""
    })
    .await;
    let paths = served_paths(&gateway.channel).await;
    let table: BTreeSet<(String, bool)> = authz::METHODS
        .iter()
        .map(|m| (m.path.to_owned(), m.streaming_request))
        .collect();
    assert_eq!(
        paths, table,
        "the authorization table and the served RPCs differ"
    );

    let mut admin = admin_client(gateway.channel.clone());
    let chat = secret(&mut admin, "chat-key", "chat").await;
    let usage = secret(&mut admin, "usage-key", "usage-read").await;
    let admin_key = secret(&mut admin, "admin-key", "admin").await;
    let mut checked = 0;
    for method in authz::METHODS {
        for credential in CREDENTIALS {
            let bearer = match credential {
                Credential::Nothing => None,
                Credential::Wrong => Some("lgw_0123456789abcdef_not-a-real-secret"),
                Credential::AdminToken => Some(ADMIN_TOKEN),
                Credential::ChatKey => Some(chat.as_str()),
                Credential::UsageKey => Some(usage.as_str()),
                Credential::AdminKey => Some(admin_key.as_str()),
            };
            // An empty message is a valid request of every type.
            let outcome =
                raw_call(&gateway.channel, method.path, bytes::Bytes::new(), bearer).await;
            let context = format!(
                "{} ({}) with {credential:?}, keys required: {keys_required}: {outcome:?}",
                method.path,
                method.requires.name()
            );
            match expected(method.requires, credential, keys_required) {
                Some(code) => {
                    let status = outcome.expect_err(&context);
                    assert_eq!(status.code(), code, "{context}");
                    let want = if code == Code::Unauthenticated {
                        "UNAUTHENTICATED"
                    } else {
                        "PERMISSION_DENIED"
                    };
                    assert_eq!(reason(&status), want, "{context}");
                }
                // Past authorization a call may still fail (an empty request is rarely a good
                // one), but never with an authorization code.
                None => {
                    if let Err(status) = &outcome {
                        assert!(
                            !matches!(
                                status.code(),
                                Code::Unauthenticated
                                    | Code::PermissionDenied
                                    | Code::Unimplemented
                                    | Code::Internal
                            ),
                            "{context}"
                        );
                    }
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, authz::METHODS.len() * CREDENTIALS.len());
}

/// The table's own rules: the data plane needs a chat key, the admin service an admin
/// credential (usage reads also a usage-read key), and only health and reflection are open.
#[test]
fn the_table_follows_the_rules() {
    for m in authz::METHODS {
        let service = m.path.split('/').nth(1).unwrap();
        let want = match service {
            "llmgateway.v1.LlmGateway" => Requirement::Chat,
            "llmgateway.v1.LlmGatewayAdmin"
                if m.path.ends_with("/GetUsage")
                    || m.path.ends_with("/ExportUsage")
                    || m.path.ends_with("/GetExperiment") =>
            {
                Requirement::UsageRead
            }
            "llmgateway.v1.LlmGatewayAdmin" => Requirement::Admin,
            "grpc.health.v1.Health"
            | "grpc.reflection.v1.ServerReflection"
            | "grpc.reflection.v1alpha.ServerReflection" => Requirement::None,
            other => panic!("{other} is not a service the gateway serves"),
        };
        assert_eq!(m.requires, want, "{}", m.path);
    }
}

#[tokio::test]
async fn every_rpc_answers_as_the_table_says_when_keys_are_required() {
    check_every_rpc(true).await;
}

#[tokio::test]
async fn every_rpc_answers_as_the_table_says_on_loopback_without_required_keys() {
    check_every_rpc(false).await;
}

#[tokio::test]
async fn unknown_methods_are_refused_before_any_service() {
    let gateway = Gateway::start("").await;
    for path in [
        "/llmgateway.v1.LlmGateway/Nope",
        "/llmgateway.v1.LlmGatewayAdmin/DropEverything",
        "/some.Other/Thing",
    ] {
        let status = raw_call(
            &gateway.channel,
            path,
            bytes::Bytes::new(),
            Some(ADMIN_TOKEN),
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{path}");
    }
}
