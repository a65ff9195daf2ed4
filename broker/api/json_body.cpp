#include "broker/api/json_body.hpp"

#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/value_stack.hpp>
#include <set>
#include <string>
#include <vector>

#include "broker/api/errc.hpp"

namespace broker::api {
namespace json = boost::json;

namespace {

// Boost.JSON's parse events, building the value as json::parser does (through a value_stack)
// while it keeps, per open object, the keys seen so far and, per open array, the index reached:
// enough to name the first repeated key by its path.
class CheckedBuilder {
 public:
  static constexpr std::size_t max_object_size = json::object::max_size();
  static constexpr std::size_t max_array_size = json::array::max_size();
  static constexpr std::size_t max_key_size = json::string::max_size();
  static constexpr std::size_t max_string_size = json::string::max_size();

  bool on_document_begin(json::error_code&) {
    stack_.reset();
    return true;
  }
  bool on_document_end(json::error_code&) { return true; }
  bool on_object_begin(json::error_code&) {
    open_.push_back(Level{true, {}, {}, 0});
    return true;
  }
  bool on_object_end(std::size_t n, json::error_code&) {
    open_.pop_back();
    stack_.push_object(n);
    return value_done();
  }
  bool on_array_begin(json::error_code&) {
    open_.push_back(Level{false, {}, {}, 0});
    return true;
  }
  bool on_array_end(std::size_t n, json::error_code&) {
    open_.pop_back();
    stack_.push_array(n);
    return value_done();
  }
  bool on_key_part(json::string_view s, std::size_t, json::error_code&) {
    key_.append(s.data(), s.size());
    stack_.push_chars(s);
    return true;
  }
  bool on_key(json::string_view s, std::size_t, json::error_code& ec) {
    key_.append(s.data(), s.size());
    auto& level = open_.back();
    if (!level.keys.insert(key_).second) {
      duplicate_ = path_to(key_);
      ec = boost::system::errc::make_error_code(boost::system::errc::invalid_argument);
      return false;
    }
    level.key = std::move(key_);
    key_.clear();
    stack_.push_key(s);
    return true;
  }
  bool on_string_part(json::string_view s, std::size_t, json::error_code&) {
    stack_.push_chars(s);
    return true;
  }
  bool on_string(json::string_view s, std::size_t, json::error_code&) {
    stack_.push_string(s);
    return value_done();
  }
  bool on_number_part(json::string_view, json::error_code&) { return true; }
  bool on_int64(std::int64_t i, json::string_view, json::error_code&) {
    stack_.push_int64(i);
    return value_done();
  }
  bool on_uint64(std::uint64_t u, json::string_view, json::error_code&) {
    stack_.push_uint64(u);
    return value_done();
  }
  bool on_double(double d, json::string_view, json::error_code&) {
    stack_.push_double(d);
    return value_done();
  }
  bool on_bool(bool b, json::error_code&) {
    stack_.push_bool(b);
    return value_done();
  }
  bool on_null(json::error_code&) {
    stack_.push_null();
    return value_done();
  }
  bool on_comment_part(json::string_view, json::error_code&) { return true; }
  bool on_comment(json::string_view, json::error_code&) { return true; }

  json::value release() { return stack_.release(); }
  const std::string& duplicate() const { return duplicate_; }

 private:
  struct Level {
    bool object;
    std::set<std::string> keys;  // object: the keys seen
    std::string key;             // object: the member being read
    std::size_t index;           // array: the element being read
  };

  // An element of an array is complete: the next one has the next index.
  bool value_done() {
    if (!open_.empty() && !open_.back().object) ++open_.back().index;
    return true;
  }

  // "disks[1].id": the open levels' members and indexes, then `key`.
  std::string path_to(const std::string& key) const {
    std::string out;
    for (std::size_t i = 0; i + 1 < open_.size(); ++i) {
      const auto& level = open_[i];
      if (!level.object) {
        out += "[" + std::to_string(level.index) + "]";
        continue;
      }
      if (!out.empty()) out += '.';
      out += level.key;
    }
    if (!out.empty()) out += '.';
    return out + key;
  }

  json::value_stack stack_;
  std::vector<Level> open_;
  std::string key_;
  std::string duplicate_;
};

Error body_error(api::errc code, std::string message, std::string field) {
  Error e(make_error_code(code), std::move(message));
  e.field = std::move(field);
  return e;
}

}  // namespace

Result<json::value> parse_json_body(std::string_view body) {
  if (body.find_first_not_of(" \t\r\n") == std::string_view::npos) return json::value(nullptr);
  json::parse_options opts;
  opts.max_depth = 64;
  json::basic_parser<CheckedBuilder> p(opts);
  json::error_code ec;
  std::size_t used = p.write_some(false, body.data(), body.size(), ec);
  if (!p.handler().duplicate().empty()) {
    const std::string& key = p.handler().duplicate();
    return body_error(api::errc::duplicate_key, key + ": the key appears twice in one object", key);
  }
  if (ec) {
    return body_error(api::errc::malformed_json,
                      "body: malformed JSON at byte " + std::to_string(used) + ": " + ec.message(),
                      "body");
  }
  // The parser stops after the value: what follows may only be whitespace.
  if (body.find_first_not_of(" \t\r\n", used) != std::string_view::npos) {
    return body_error(api::errc::malformed_json,
                      "body: malformed JSON at byte " + std::to_string(used) + ": trailing data",
                      "body");
  }
  return p.handler().release();
}

}  // namespace broker::api
