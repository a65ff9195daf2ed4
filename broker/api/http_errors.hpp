// The one map from error codes to HTTP statuses (style point 4). Every module's errc (broker,
// lifecycle, fdpass, qmp, api) and errno values are mapped here and nowhere else; the JSON error
// body is built here too:
//   {"error": {"code": "...", "message": "...", "field": "..."?, "qmp": {"class", "desc"}?}}
#pragma once

#include <boost/beast/http/status.hpp>
#include <boost/json/object.hpp>
#include <string>
#include <system_error>

#include "broker/core/error.hpp"

namespace broker::api {

struct ErrorClass {
  boost::beast::http::status status = boost::beast::http::status::internal_server_error;
  std::string code;  // a stable name: the enumerator ("not_found", "step_exec") or errno ("ENOENT")
};

ErrorClass classify(const std::error_code& ec);

// The error body for `e`.
boost::json::object error_body(const Error& e);

}  // namespace broker::api
