// docs/api.yaml (OpenAPI 3) and the router list exactly the same routes, with the same
// operationIds; docs/api.md documents each with a curl command.
#include <yaml.h>

#include <fstream>
#include <functional>
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
  // `node`, or the node its {$ref: "#/a/b"} names.
  yaml_node_t* resolve(yaml_node_t* node) {
    auto ref = scalar(get(node, "$ref"));
    if (ref.rfind("#/", 0) != 0) return node;
    yaml_node_t* at = root();
    for (std::size_t start = 2; at != nullptr && start <= ref.size();) {
      auto slash = ref.find('/', start);
      if (slash == std::string::npos) slash = ref.size();
      at = get(at, ref.substr(start, slash - start));
      start = slash + 1;
    }
    return at;
  }
  std::vector<yaml_node_t*> items(yaml_node_t* seq) {
    std::vector<yaml_node_t*> out;
    if (seq == nullptr || seq->type != YAML_SEQUENCE_NODE) return out;
    for (auto* i = seq->data.sequence.items.start; i < seq->data.sequence.items.top; ++i) {
      out.push_back(yaml_document_get_node(&doc_, *i));
    }
    return out;
  }
  // Every mapping under `node`, depth first, with the key that leads to it.
  void walk(yaml_node_t* node, const std::function<void(std::string_view, yaml_node_t*)>& f,
            std::string_view key = {}) {
    if (node == nullptr) return;
    if (node->type == YAML_MAPPING_NODE) {
      f(key, node);
      for (auto& [k, v] : entries(node)) walk(v, f, k);
    } else {
      for (auto* item : items(node)) walk(item, f, key);
    }
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

namespace {

// The operations of docs/api.yaml: method, path, the operation and its path item.
struct Operation {
  std::string method;
  std::string path;
  yaml_node_t* op;
  yaml_node_t* item;
};

std::vector<Operation> operations(Yaml& y) {
  static const std::set<std::string> kMethods{"get", "put", "post", "delete"};
  std::vector<Operation> out;
  for (auto& [path, item] : y.entries(y.get(y.root(), "paths"))) {
    for (auto& [method, op] : y.entries(item)) {
      if (kMethods.contains(method)) out.push_back({method, path, op, item});
    }
  }
  return out;
}

}  // namespace

TEST_CASE(
    "docs/api.yaml: fields are names, every operation is secured, every path parameter has "
    "an example and every operation lists the errors any request may get",
    "[api][openapi]") {
  Yaml y(QB_SOURCE_DIR "/docs/api.yaml");
  REQUIRE(y.ok());
  // A comma in an unquoted flow-style description once made "beneath an image root" a property.
  y.walk(y.root(), [&](std::string_view key, yaml_node_t* node) {
    if (key != "properties") return;
    for (auto& [name, schema] : y.entries(node)) {
      INFO(name);
      CHECK(std::all_of(name.begin(), name.end(),
                        [](char c) { return std::islower(c) || c == '_'; }));
    }
  });
  auto* schemes = y.get(y.get(y.root(), "components"), "securitySchemes");
  REQUIRE(y.get(schemes, "peerCredentials") != nullptr);
  auto security = y.items(y.get(y.root(), "security"));
  REQUIRE(security.size() == 1);
  CHECK(y.get(security[0], "peerCredentials") != nullptr);
  for (auto& o : operations(y)) {
    INFO(o.method << " " << o.path);
    CHECK(y.get(o.op, "security") == nullptr);  // the document's one scheme, not another
    std::set<std::string> with_example;
    for (auto* list : {y.get(o.item, "parameters"), y.get(o.op, "parameters")}) {
      for (auto* p : y.items(list)) {
        p = y.resolve(p);
        if (y.get(p, "example") != nullptr)
          with_example.insert(Yaml::scalar(y.get(p, "name")));
        else
          CHECK(Yaml::scalar(y.get(p, "in")) != "path");
      }
    }
    // Each {param} of the path template has a parameter with an example, for dredd to fill in.
    for (std::size_t at = o.path.find('{'); at != std::string::npos;
         at = o.path.find('{', at + 1)) {
      auto name = o.path.substr(at + 1, o.path.find('}', at) - at - 1);
      INFO(name);
      CHECK(with_example.contains(name));
    }
    auto* responses = y.get(o.op, "responses");
    for (const char* status : {"400", "403", "408", "413", "415", "431", "503"}) {
      INFO(status);
      CHECK(y.get(responses, status) != nullptr);
    }
  }
}

namespace {

// A create body: {"name": "vm1", "kernel": "/k"} and `extra` members.
std::string create_body(const std::string& extra) {
  return R"({"name":"vm1","kernel":"/k")" + (extra.empty() ? "" : "," + extra) + "}";
}

// The field a POST refuses, or "" when it is accepted.
std::string refused_field(std::string_view target, const std::string& body) {
  auto r = broker::api::route(boost::beast::http::verb::post, target, body);
  return r ? std::string() : r.error().field;
}

std::string items(std::size_t n, const std::function<std::string(std::size_t)>& item) {
  std::string out = "[";
  for (std::size_t i = 0; i < n; ++i) out += (i ? "," : "") + item(i);
  return out + "]";
}

}  // namespace

TEST_CASE("docs/api.yaml's numeric and length limits are the validators'", "[api][openapi]") {
  Yaml y(QB_SOURCE_DIR "/docs/api.yaml");
  REQUIRE(y.ok());
  auto* schemas = y.get(y.get(y.root(), "components"), "schemas");
  auto number = [&](const char* schema, const char* field, const char* limit) {
    auto* node = y.get(y.get(y.get(y.get(schemas, schema), "properties"), field), limit);
    if (node == nullptr) node = y.get(y.get(schemas, schema), limit);
    INFO(schema << "." << field << " " << limit);
    REQUIRE(node != nullptr);
    return std::stoull(Yaml::scalar(node));
  };
  // Integers: the limit is accepted, one past it is refused naming the field.
  for (const char* field : {"memory_mib", "vcpus", "pci_slots"}) {
    INFO(field);
    auto min = number("CreateDomain", field, "minimum");
    auto max = number("CreateDomain", field, "maximum");
    auto with = [&](unsigned long long v) {
      return refused_field("/v1/domains",
                           create_body("\"" + std::string(field) + "\":" + std::to_string(v)));
    };
    CHECK(with(min) == "");
    CHECK(with(max) == "");
    CHECK(with(max + 1) == field);
    if (min > 0) CHECK(with(min - 1) == field);
  }
  auto append = number("CreateDomain", "append", "maxLength");
  CHECK(refused_field("/v1/domains",
                      create_body(R"("append":")" + std::string(append, 'a') + "\"")) == "");
  CHECK(refused_field("/v1/domains", create_body(R"("append":")" + std::string(append + 1, 'a') +
                                                 "\"")) == "append");
  auto name = number("Name", "", "maxLength");
  CHECK(refused_field("/v1/domains", R"({"name":")" + std::string(name, 'a') + "\"}") == "");
  CHECK(refused_field("/v1/domains", R"({"name":")" + std::string(name + 1, 'a') + "\"}") ==
        "name");
  // Device lists.
  auto cd = [](std::size_t i) { return R"({"id":"c)" + std::to_string(i) + "\"}"; };
  auto disk = [](std::size_t i) { return R"({"id":"d)" + std::to_string(i) + R"(","path":"/d"})"; };
  auto nic = [](std::size_t i) { return R"({"id":"n)" + std::to_string(i) + "\"}"; };
  for (auto [field, item] :
       {std::pair<const char*, std::function<std::string(std::size_t)>>{"cdroms", cd},
        {"disks", disk},
        {"nics", nic}}) {
    INFO(field);
    auto max = number("CreateDomain", field, "maxItems");
    auto list = [&](std::size_t n) { return "\"" + std::string(field) + "\":" + items(n, item); };
    CHECK(refused_field("/v1/domains", create_body(list(max))) == "");
    CHECK(refused_field("/v1/domains", create_body(list(max + 1))) == field);
  }
  // A disk's serial and diskseq, a NIC's tap.
  auto serial = number("Disk", "serial", "maxLength");
  auto disk_with = [](const std::string& extra) {
    return R"({"id":"d1","path":"/d",)" + extra + "}";
  };
  CHECK(refused_field("/v1/domains/vm1/disks",
                      disk_with(R"("serial":")" + std::string(serial, 's') + "\"")) == "");
  CHECK(refused_field("/v1/domains/vm1/disks",
                      disk_with(R"("serial":")" + std::string(serial + 1, 's') + "\"")) ==
        "serial");
  auto diskseq = number("Disk", "diskseq", "minimum");
  CHECK(refused_field("/v1/domains/vm1/disks",
                      disk_with(R"("diskseq":)" + std::to_string(diskseq))) == "");
  CHECK(refused_field("/v1/domains/vm1/disks",
                      disk_with(R"("diskseq":)" + std::to_string(diskseq - 1))) == "diskseq");
  auto tap = number("Nic", "tap", "maxLength");
  CHECK(refused_field("/v1/domains/vm1/nics",
                      R"({"id":"n0","tap":")" + std::string(tap, 't') + "\"}") == "");
  CHECK(refused_field("/v1/domains/vm1/nics",
                      R"({"id":"n0","tap":")" + std::string(tap + 1, 't') + "\"}") == "tap");
}
