//! The SSE framing: any bytes, cut anywhere, give the same events (or the same classified
//! error) as the bytes in one piece, and never panic.

use proptest::{collection::vec, prelude::*};

use crate::{
    error::upstream_code,
    providers::{
        ProviderError,
        sse::{SseDecoder, SseEvent},
    },
};

/// Bytes that look like an event stream, with the odd broken piece.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    let line = prop_oneof![
        "data: [ -~]{0,20}".prop_map(String::into_bytes),
        "event: [a-z_]{0,12}".prop_map(String::into_bytes),
        ": [ -~]{0,10}".prop_map(String::into_bytes),
        "(id|retry|data|event)(:)?[ -~]{0,8}".prop_map(String::into_bytes),
        Just(Vec::new()),
        vec(any::<u8>(), 0..8),
    ];
    let end = prop_oneof![
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec())
    ];
    vec((line, end), 0..16).prop_map(|lines| {
        lines
            .into_iter()
            .flat_map(|(mut l, e)| {
                l.extend(e);
                l
            })
            .collect()
    })
}

/// Everything the decoder yields for `bytes` pushed in `pieces`, up to its first error.
fn decode(bytes: &[u8], cuts: &[usize]) -> (Vec<SseEvent>, Option<ProviderError>) {
    let mut dec = SseDecoder::new();
    let mut events = Vec::new();
    let mut start = 0;
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    bounds.sort_unstable();
    bounds.push(bytes.len());
    for end in bounds {
        dec.push(&bytes[start..end.max(start)]);
        start = end.max(start);
        while let Some(item) = dec.next_event() {
            match item {
                Ok(event) => events.push(event.clone()),
                Err(err) => return (events, Some(err)),
            }
        }
    }
    (events, None)
}

proptest! {
    #![proptest_config(super::config())]

    #[test]
    fn events_do_not_depend_on_how_the_bytes_arrive(
        bytes in prop_oneof![stream_bytes(), vec(any::<u8>(), 0..128)],
        cuts in vec(any::<usize>(), 0..8),
    ) {
        let (whole, whole_err) = decode(&bytes, &[]);
        let (pieces, pieces_err) = decode(&bytes, &cuts);
        // One byte at a time too.
        let every: Vec<usize> = (0..bytes.len()).collect();
        let (bytewise, bytewise_err) = decode(&bytes, &every);
        prop_assert_eq!(&whole, &pieces);
        prop_assert_eq!(&whole, &bytewise);
        let classes = [&whole_err, &pieces_err, &bytewise_err].map(|e| e.as_ref().map(|e| e.class));
        prop_assert_eq!(classes[0], classes[1]);
        prop_assert_eq!(classes[0], classes[2]);
        if let Some(err) = whole_err {
            prop_assert_ne!(upstream_code(err.class, false), tonic::Code::Internal);
        }
    }
}
