#include "broker/api/errc.hpp"

#include <string>

namespace broker::api {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "api"; }
  std::string message(int ev) const override {
    switch (static_cast<errc>(ev)) {
      case errc::ok:
        return "success";
      case errc::no_route:
        return "no such route";
      case errc::method_not_allowed:
        return "method not allowed on this route";
      case errc::malformed_json:
        return "malformed JSON";
      case errc::bad_request:
        return "malformed HTTP request";
      case errc::body_too_large:
        return "request body too large";
      case errc::header_too_large:
        return "request header too large";
      case errc::request_timeout:
        return "request not received in time";
      case errc::too_many_connections:
        return "too many connections";
      case errc::unauthorized_peer:
        return "peer is not authorized";
      case errc::shutting_down:
        return "the daemon is shutting down";
      case errc::unsupported_transfer_coding:
        return "transfer coding not supported";
      case errc::duplicate_key:
        return "duplicate key in a JSON object";
      case errc::unsupported_media_type:
        return "the body is not application/json";
      case errc::method_not_implemented:
        return "method not implemented";
    }
    return "unknown api error";
  }
};

}  // namespace

const std::error_category& category() noexcept {
  static const Category instance;
  return instance;
}

}  // namespace broker::api
