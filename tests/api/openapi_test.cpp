// docs/api.yaml (OpenAPI 3) and the router list exactly the same routes, with the same
// operationIds; docs/api.md documents each with a curl command.
#include <yaml.h>

#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "broker/api/router.hpp"
#include "support/support.hpp"

namespace {

// A YAML document as a tree of nodes (libyaml's document API), with a lookup helper.
class Yaml {
 public:
  explicit Yaml(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    text_ = ss.str();
    yaml_parser_t parser;
    yaml_parser_initialize(&parser);
    yaml_parser_set_input_string(&parser, reinterpret_cast<const unsigned char*>(text_.data()),
                                 text_.size());
    ok_ = yaml_parser_load(&parser, &doc_) == 1 && yaml_document_get_root_node(&doc_) != nullptr;
    if (!ok_) error_ = parser.problem != nullptr ? parser.problem : "unknown";
    yaml_parser_delete(&parser);
  }
  ~Yaml() {
    if (ok_) yaml_document_delete(&doc_);
  }
  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  yaml_node_t* root() { return yaml_document_get_root_node(&doc_); }
  yaml_node_t* get(yaml_node_t* map, std::string_view key) {
    if (map == nullptr || map->type != YAML_MAPPING_NODE) return nullptr;
    for (auto* p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; ++p) {
      if (scalar(yaml_document_get_node(&doc_, p->key)) == key)
        return yaml_document_get_node(&doc_, p->value);
    }
    return nullptr;
  }
  std::vector<std::pair<std::string, yaml_node_t*>> entries(yaml_node_t* map) {
    std::vector<std::pair<std::string, yaml_node_t*>> out;
    if (map == nullptr || map->type != YAML_MAPPING_NODE) return out;
    for (auto* p = map->data.mapping.pairs.start; p < map->data.mapping.pairs.top; ++p) {
      out.emplace_back(scalar(yaml_document_get_node(&doc_, p->key)),
                       yaml_document_get_node(&doc_, p->value));
    }
    return out;
  }
  static std::string scalar(yaml_node_t* n) {
    if (n == nullptr || n->type != YAML_SCALAR_NODE) return {};
    return std::string(reinterpret_cast<const char*>(n->data.scalar.value), n->data.scalar.length);
  }

 private:
  std::string text_;
  yaml_document_t doc_{};
  bool ok_ = false;
  std::string error_;
};

std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

}  // namespace

TEST_CASE("docs/api.yaml lists exactly the router's routes", "[api][openapi]") {
  Yaml y(QB_SOURCE_DIR "/docs/api.yaml");
  INFO(y.error());
  REQUIRE(y.ok());
  CHECK(Yaml::scalar(y.get(y.root(), "openapi")).rfind("3.", 0) == 0);
  REQUIRE(y.get(y.get(y.root(), "info"), "title") != nullptr);

  std::map<std::pair<std::string, std::string>, std::string> doc;
  static const std::set<std::string> kMethods{"get",   "put",  "post",   "delete",
                                              "patch", "head", "options"};
  auto* paths = y.get(y.root(), "paths");
  REQUIRE(paths != nullptr);
  for (auto& [path, item] : y.entries(paths)) {
    for (auto& [method, op] : y.entries(item)) {
      if (!kMethods.contains(method)) continue;
      doc[{upper(method), path}] = Yaml::scalar(y.get(op, "operationId"));
      INFO(method << " " << path);
      CHECK(y.get(op, "responses") != nullptr);
      CHECK(y.get(y.get(op, "responses"), "default") != nullptr);  // the error shape
    }
  }
  std::map<std::pair<std::string, std::string>, std::string> router;
  for (const auto& r : broker::api::routes()) {
    router[{std::string(boost::beast::http::to_string(r.method)), std::string(r.path)}] =
        std::string(r.operation);
  }
  CHECK(doc == router);

  // The error schema is the one every error carries.
  auto* schemas = y.get(y.get(y.root(), "components"), "schemas");
  auto* error = y.get(schemas, "Error");
  REQUIRE(error != nullptr);
  auto* inner = y.get(y.get(y.get(error, "properties"), "error"), "properties");
  for (const char* field : {"code", "message", "field", "qmp"}) {
    INFO(field);
    CHECK(y.get(inner, field) != nullptr);
  }
}

TEST_CASE("docs/api.md shows a curl command for every route", "[api][openapi]") {
  std::ifstream in(QB_SOURCE_DIR "/docs/api.md");
  std::stringstream ss;
  ss << in.rdbuf();
  std::string md = ss.str();
  REQUIRE_FALSE(md.empty());
  CHECK(md.find(R"({"error":{"code")") != std::string::npos);
  for (const auto& r : broker::api::routes()) {
    std::string heading =
        "### " + std::string(boost::beast::http::to_string(r.method)) + " " + std::string(r.path);
    INFO(heading);
    auto at = md.find(heading + "\n");
    REQUIRE(at != std::string::npos);
    auto next = md.find("\n### ", at + 1);
    std::string section = md.substr(at, next == std::string::npos ? std::string::npos : next - at);
    CHECK(section.find("curl --unix-socket /run/qbroker/qbroker.sock") != std::string::npos);
    CHECK(section.find("qbrokerctl ") != std::string::npos);
  }
}
