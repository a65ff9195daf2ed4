// Error codes of the HTTP front end itself: refusals decided before a request reaches the Broker
// (routing, framing, limits, peer authorization). broker/api/http_errors.cpp maps them, like every
// other module's codes, to a status in one place.
#pragma once

#include <system_error>

namespace broker::api {

enum class errc {
  ok = 0,
  no_route,                     // 404: no route has this path
  method_not_allowed,           // 405: the path exists, the method does not
  malformed_json,               // 400: the body is not JSON
  bad_request,                  // 400: the HTTP request itself is malformed
  body_too_large,               // 413: the body exceeds the configured limit
  header_too_large,             // 431: the header exceeds the configured limit
  request_timeout,              // 408: the request did not arrive in time (slowloris)
  too_many_connections,         // 503: the connection limit (total or per peer uid) is reached
  unauthorized_peer,            // 403: the peer is neither root nor in the admin group
  shutting_down,                // 503: the daemon is stopping
  unsupported_transfer_coding,  // 501: a transfer coding other than chunked
  duplicate_key,                // 400: an object of the JSON body has a key twice
  unsupported_media_type,       // 415: a body that is not declared application/json
  method_not_implemented,       // 501: a method no route takes, on a path no route has
};
// How many enumerators errc has: they run from 0 to the one named here, which must stay the
// last (tests/api/http_errors_test.cpp fails to compile otherwise).
inline constexpr int kErrcCount = static_cast<int>(errc::method_not_implemented) + 1;

const std::error_category& category() noexcept;
inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), category()};
}

}  // namespace broker::api

template <>
struct std::is_error_code_enum<broker::api::errc> : std::true_type {};
