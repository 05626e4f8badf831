//! The raw proxy-wasm ABI v0.2.1 imports (module `env`) the SDK uses. On non-wasm targets
//! (host builds, docs, unit tests) they are replaced by stubs answering `UNIMPLEMENTED`, so
//! the crate type-checks and its pure parts can be tested anywhere.

#[cfg(target_arch = "wasm32")]
#[link(wasm_import_module = "env")]
unsafe extern "C" {
    pub fn proxy_log(level: u32, message: *const u8, size: usize) -> u32;
    pub fn proxy_get_current_time_nanoseconds(ret: *mut u64) -> u32;
    pub fn proxy_get_shared_data(
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
        ret_cas: *mut u32,
    ) -> u32;
    pub fn proxy_set_shared_data(
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    pub fn proxy_get_buffer_bytes(
        kind: u32,
        start: usize,
        max: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    pub fn proxy_set_buffer_bytes(
        kind: u32,
        start: usize,
        size: usize,
        data: *const u8,
        data_size: usize,
    ) -> u32;
    pub fn proxy_get_header_map_pairs(
        map: u32,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    pub fn proxy_get_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    pub fn proxy_add_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    pub fn proxy_replace_header_map_value(
        map: u32,
        key: *const u8,
        key_size: usize,
        value: *const u8,
        value_size: usize,
    ) -> u32;
    pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_size: usize) -> u32;
    pub fn proxy_send_local_response(
        status: u32,
        details: *const u8,
        details_size: usize,
        body: *const u8,
        body_size: usize,
        headers: *const u8,
        headers_size: usize,
        grpc_status: i32,
    ) -> u32;
    pub fn proxy_get_property(
        path: *const u8,
        path_size: usize,
        ret_data: *mut *mut u8,
        ret_size: *mut usize,
    ) -> u32;
    pub fn proxy_define_metric(
        kind: u32,
        name: *const u8,
        name_size: usize,
        ret_id: *mut u32,
    ) -> u32;
    pub fn proxy_increment_metric(id: u32, delta: i64) -> u32;
    pub fn proxy_record_metric(id: u32, value: u64) -> u32;
    pub fn proxy_get_metric(id: u32, ret: *mut u64) -> u32;
    #[allow(clippy::too_many_arguments)]
    pub fn proxy_http_call(
        upstream: *const u8,
        upstream_size: usize,
        headers: *const u8,
        headers_size: usize,
        body: *const u8,
        body_size: usize,
        trailers: *const u8,
        trailers_size: usize,
        timeout_ms: u32,
        ret_token: *mut u32,
    ) -> u32;
    pub fn proxy_grpc_call(
        upstream: *const u8,
        upstream_size: usize,
        service: *const u8,
        service_size: usize,
        method: *const u8,
        method_size: usize,
        metadata: *const u8,
        metadata_size: usize,
        message: *const u8,
        message_size: usize,
        timeout_ms: u32,
        ret_token: *mut u32,
    ) -> u32;
    pub fn proxy_grpc_stream(
        upstream: *const u8,
        upstream_size: usize,
        service: *const u8,
        service_size: usize,
        method: *const u8,
        method_size: usize,
        metadata: *const u8,
        metadata_size: usize,
        ret_token: *mut u32,
    ) -> u32;
    pub fn proxy_grpc_send(token: u32, message: *const u8, size: usize, end_stream: u32) -> u32;
    pub fn proxy_grpc_close(token: u32) -> u32;
    pub fn proxy_grpc_cancel(token: u32) -> u32;
    pub fn proxy_get_status(
        ret_code: *mut u32,
        ret_message: *mut *mut u8,
        ret_message_size: *mut usize,
    ) -> u32;
    pub fn proxy_set_effective_context(context_id: u32) -> u32;
    pub fn proxy_continue_stream(stream_type: u32) -> u32;
    pub fn proxy_close_stream(stream_type: u32) -> u32;
}

#[cfg(not(target_arch = "wasm32"))]
mod stubs {
    //! Host-target stand-ins: every call answers UNIMPLEMENTED (12).
    #![allow(clippy::missing_safety_doc, clippy::too_many_arguments)]
    const UNIMPLEMENTED: u32 = 12;
    pub unsafe fn proxy_log(_: u32, _: *const u8, _: usize) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_current_time_nanoseconds(_: *mut u64) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_shared_data(
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
        _: *mut u32,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_set_shared_data(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_buffer_bytes(
        _: u32,
        _: usize,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_set_buffer_bytes(
        _: u32,
        _: usize,
        _: usize,
        _: *const u8,
        _: usize,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_header_map_pairs(_: u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_add_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_replace_header_map_value(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_remove_header_map_value(_: u32, _: *const u8, _: usize) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_send_local_response(
        _: u32,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: i32,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_property(
        _: *const u8,
        _: usize,
        _: *mut *mut u8,
        _: *mut usize,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_define_metric(_: u32, _: *const u8, _: usize, _: *mut u32) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_increment_metric(_: u32, _: i64) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_record_metric(_: u32, _: u64) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_metric(_: u32, _: *mut u64) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_http_call(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
        _: *mut u32,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_grpc_call(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: u32,
        _: *mut u32,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_grpc_stream(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *mut u32,
    ) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_grpc_send(_: u32, _: *const u8, _: usize, _: u32) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_grpc_close(_: u32) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_grpc_cancel(_: u32) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_get_status(_: *mut u32, _: *mut *mut u8, _: *mut usize) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_set_effective_context(_: u32) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_continue_stream(_: u32) -> u32 {
        UNIMPLEMENTED
    }
    pub unsafe fn proxy_close_stream(_: u32) -> u32 {
        UNIMPLEMENTED
    }
}

#[cfg(not(target_arch = "wasm32"))]
pub use stubs::*;
