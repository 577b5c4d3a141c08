//! The protobuf codec of every Cairn service: prost's, with decode errors
//! mapped to the caller's fault.
//!
//! tonic's `ProstCodec` answers bytes that do not parse as the expected
//! message with `INTERNAL`, which tells an operator the node is broken and
//! a client to retry. An undecodable message is the sender's error, so it is
//! `INVALID_ARGUMENT` here. Size limits stay tonic's: a message longer than
//! the method's limit is refused from its 5-byte length prefix with
//! `OUT_OF_RANGE` (or `RESOURCE_EXHAUSTED` when decompressing), before its
//! body is buffered.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// `tonic_prost::ProstCodec` with undecodable messages as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct CairnCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for CairnCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for CairnCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = CairnDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        CairnDecoder {
            _pd: PhantomData,
            buffer_settings: BufferSettings::default(),
        }
    }
}

/// Decodes `U`; a parse error is the sender's (`INVALID_ARGUMENT`).
#[derive(Debug, Clone)]
pub struct CairnDecoder<U> {
    _pd: PhantomData<U>,
    buffer_settings: BufferSettings,
}

impl<U: Message + Default> Decoder for CairnDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        U::decode(buf).map(Some).map_err(decode_error)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.buffer_settings
    }
}

/// The status for bytes that do not decode. prost's message names the
/// message and field types only, never the bytes themselves.
pub fn decode_error(error: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed protobuf message: {error}"))
}
