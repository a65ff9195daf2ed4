// A request body read as JSON, strictly: at most 64 levels deep, nothing after the value, and no
// key twice in one object. Boost.JSON's own parser keeps the last of two equal keys, so a body
// with "memory_mib" twice would be acted on with a value a reader of the request may not have
// seen; here it is refused, naming the key (api::errc::duplicate_key, 400) with its path as the
// body's validators spell fields: "disks[1].id", "vnc.listen".
#pragma once

#include <boost/json/value.hpp>
#include <string_view>

#include "broker/core/error.hpp"

namespace broker::api {

// The body's value; JSON null for an empty or all-whitespace body. Errors: malformed_json naming
// "body", or duplicate_key naming the repeated key.
Result<boost::json::value> parse_json_body(std::string_view body);

}  // namespace broker::api
